// The truncated log-normal's mean and variance in one pass (forward only).
//
// The element-wise counterpart of pyro_sbp/distributions/truncated_log_normal.py: from the
// parameters of the truncated normal of log(theta) (loc, scale, log low, log high), the shifts of
// _shift (with the moves m_t of the point nearest zero), the closed-form log Zhat of the normal
// and of its tilts by e^x and e^2x (_log_mean, _kappa), the tilted variance of
// _standard.moments (flat case included) where kappa is small;
// mean = min(exp(K(1)), high), variance = exp(2 K(1)) expm1(kappa).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "simd_common.h"

namespace pyro_sbp {
namespace {

// kappa's switch: below it, the tilted variance sigma^2 Var replaces the difference of log Zhats.
template <typename T>
inline T kappa_switch() {
  return is_double<T>() ? T(1e-7) : T(1e-3);
}

template <typename T>
void moments_kernel(const Broadcast& bc, const T* loc, const T* scale, const T* low,
                    const T* high, T* mean, T* variance) {
  const T switch_at = kappa_switch<T>();
  at::parallel_for(0, bc.numel, 512, [&](int64_t begin, int64_t end) {
    bc.for_range<4>(begin, end, [&](int64_t i, const int64_t* o) {
      const T mu = loc[o[0]], sigma = scale[o[1]], lo = low[o[2]], hi = high[o[3]];
      const T alpha = (lo - mu) / sigma;
      const T beta = (hi - mu) / sigma;
      const T width = (hi - lo) / sigma;
      // _shift.
      const T s0 = nearest_to_zero(alpha, beta);
      const T k1 = std::min(std::max(sigma, alpha), beta);
      const T k2 = std::min(std::max(T(2) * sigma, alpha), beta);
      const T m1 = k1 - s0;
      const T m21 = k2 - k1;
      const T m2 = m1 + m21;
      const T d1 = sigma - m1;
      const T ts2 = T(2) * sigma;
      // log Zhat of the normal and of its tilts (log_zhat's closed forms; the tilt by e^x's
      // from its statistics, which hold it).
      const T lz0 = closed_log_zhat(canonical(alpha, beta, width));
      const Canon<T> c1 = canonical(alpha - sigma, beta - sigma, width);
      const Stats<T> st1 = closed_stats(c1, true);
      const T lz1 = st1.log_zhat;
      const T lz2 = closed_log_zhat(canonical(alpha - ts2, beta - ts2, width));
      // _log_mean.
      const T log_mean = mu + d1 * s0 + T(0.5) * m1 * (sigma + d1) + lz1 - lz0;
      // _kappa.
      T exact = (m1 - m21) * s0 + T(2) * sigma * m21 - T(0.5) * (m2 * m2) + m1 * m1;
      exact = exact + (lz2 - lz1) - (lz1 - lz0);
      const T tilted_var = is_flat(c1.al, c1.be, c1.wd) ? flat_variance(c1.al, c1.wd) : st1.var;
      const T small = sigma * sigma * tilted_var;
      const T kappa = clamp_min0(small < switch_at ? small : exact);
      // mean and variance (torch.minimum propagates nan).
      const T e = std::exp(log_mean);
      const T cap = std::exp(hi);
      mean[i] = std::isnan(e) ? e : std::min(e, cap);
      variance[i] = std::exp(log_mean * T(2)) * std::expm1(kappa);
    });
  });
}

#ifdef PYRO_SBP_SIMD
// moments_kernel<float>, eight lanes at a time: each of the three log Zhats runs its closed forms
// on its own lists of straddling and tail elements; the nearly flat tilted intervals take
// flat_variance.
void moments_kernel_simd(const Broadcast& bc, const float* loc, const float* scale,
                         const float* low, const float* high, float* mean, float* variance) {
  using namespace simd;
  const V switch_at = kappa_switch<float>();
  at::parallel_for(0, bc.numel, 2048, [&](int64_t begin, int64_t end) {
    Walker<4> w(bc.shape, bc.strides, begin);
    alignas(32) float p[4][kBlock];
    alignas(32) float alpha0[kBlock], beta0[kBlock], alpha[kBlock], beta[kBlock], width[kBlock];
    alignas(32) float lz0[kBlock], lz1[kBlock], lz2[kBlock], tvar[kBlock];
    alignas(32) float out_m[kBlock], out_v[kBlock];
    const float* src[4] = {loc, scale, low, high};
    CanonBlock cb;
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, end - b0));
      load_block(w, src, n, p);
      // The normal's standardised bounds (kept for the shifts below), then its tilts'.
      standardise(p, n, 0, alpha0, beta0, width);
      cb.set(alpha0, beta0, width, n, Flat::kIgnore);
      closed_log_zhat(cb, lz0);
      standardise(p, n, 2, alpha, beta, width);
      cb.set(alpha, beta, width, n, Flat::kIgnore);
      closed_log_zhat(cb, lz2);
      // The tilt by e^x: log Zhat and the variance from its statistics, the nearly flat
      // intervals' variance by flat_variance.
      standardise(p, n, 1, alpha, beta, width);
      cb.set(alpha, beta, width, n, Flat::kAlsoList);
      for_lanes(cb.tail, [&](int j, __m256i ix) {
        const V al = gather(cb.al, ix), be = gather(cb.be, ix), wd = gather(cb.wd, ix);
        const StatsV st = tail_stats(al, be, wd, true);
        scatter(lz1, cb.tail, j, st.log_zhat);
        scatter(tvar, cb.tail, j, st.var);
      });
      for_lanes(cb.straddle, [&](int j, __m256i ix) {
        const StatsV st = straddle_stats(gather(cb.al, ix), gather(cb.be, ix), true);
        scatter(lz1, cb.straddle, j, st.log_zhat);
        scatter(tvar, cb.straddle, j, st.var);
      });
      for (int j = 0; j < cb.flat.n; ++j) {
        const int k = cb.flat.idx[j];
        tvar[k] = flat_variance(cb.al[k], cb.wd[k]);
      }
      for (int i = 0; i < n; i += kLanes) {
        const V mu = V::load(p[0] + i), sigma = V::load(p[1] + i);
        const V hi = V::load(p[3] + i);
        const V a = V::load(alpha0 + i), b = V::load(beta0 + i);
        const V s0 = select(a < V(0.0f), V(0.0f), a) + select(b > V(0.0f), V(0.0f), b);
        const V k1 = min(max(sigma, a), b);
        const V k2 = min(max(V(2.0f) * sigma, a), b);
        const V m1 = k1 - s0, m21 = k2 - k1;
        const V m2 = m1 + m21;
        const V d1 = sigma - m1;
        const V l0 = V::load(lz0 + i), l1 = V::load(lz1 + i), l2 = V::load(lz2 + i);
        const V log_mean = mu + d1 * s0 + V(0.5f) * m1 * (sigma + d1) + l1 - l0;
        V exact = (m1 - m21) * s0 + V(2.0f) * sigma * m21 - V(0.5f) * (m2 * m2) + m1 * m1;
        exact = exact + (l2 - l1) - (l1 - l0);
        const V small = sigma * sigma * V::load(tvar + i);
        const V kappa = clamp_min0(select(small < switch_at, small, exact));
        // min(e, exp(high)): exp(high) is needed only where log_mean < high fails.
        const V e = exp(log_mean);
        const V cap = any(~(log_mean < hi)) ? exp(hi) : e;
        select(isnan(e), e, min(e, cap)).store(out_m + i);
        (exp(log_mean * V(2.0f)) * expm1(kappa)).store(out_v + i);
      }
      std::copy(out_m, out_m + n, mean + b0);
      std::copy(out_v, out_v + n, variance + b0);
    }
  });
}
#endif

std::tuple<at::Tensor, at::Tensor> tln_moments(const at::Tensor& loc, const at::Tensor& scale,
                                               const at::Tensor& log_low,
                                               const at::Tensor& log_high) {
  const std::vector<at::Tensor> params{loc, scale, log_low, log_high};
  for (const auto& p : params) {
    TORCH_CHECK(p.device().is_cpu(), "tln_moments: CPU tensors only");
  }
  const Broadcast bc(params);
  auto mean = at::empty(bc.shape, loc.options());
  auto variance = at::empty(bc.shape, loc.options());
#ifdef PYRO_SBP_SIMD
  if (loc.scalar_type() == at::kFloat) {
    moments_kernel_simd(bc, loc.data_ptr<float>(), scale.data_ptr<float>(),
                        log_low.data_ptr<float>(), log_high.data_ptr<float>(),
                        mean.data_ptr<float>(), variance.data_ptr<float>());
    return {mean, variance};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(loc.scalar_type(), "tln_moments", [&] {
    moments_kernel<scalar_t>(bc, loc.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                             log_low.data_ptr<scalar_t>(), log_high.data_ptr<scalar_t>(),
                             mean.data_ptr<scalar_t>(), variance.data_ptr<scalar_t>());
  });
  return {mean, variance};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyro_sbp, m) {
  m.def(
      "tln_moments(Tensor loc, Tensor scale, Tensor log_low, Tensor log_high) -> "
      "(Tensor mean, Tensor variance)");
}

TORCH_LIBRARY_IMPL(pyro_sbp, CPU, m) { m.impl("tln_moments", TORCH_FN(tln_moments)); }

}  // namespace pyro_sbp
