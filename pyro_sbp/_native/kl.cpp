// KL(N_[low, high](loc, scale^2) || U[q_low, q_high]) and its derivatives in loc and scale, in one
// pass.
//
// The element-wise counterpart of pyro_sbp/distributions/kl.py::_kl_to_uniform: the KL to the
// uniform on the same interval (_standard.kl_to_uniform with the entropy of _standard.moments,
// by quadrature where the density is nearly flat), plus log(q_high - q_low) - log(high - low),
// clamped at zero, inf where [low, high] is not inside [q_low, q_high]; and, when asked, the
// derivatives of _kl_grad.kl_derivatives (straddle, tail and flat forms), zero where the PyTorch
// path's backward passes none (not nested, or clamped).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"
#include "simd_common.h"

namespace pyro_sbp {
namespace {

// KL(N_[alpha, beta](0, 1) || U[alpha, beta]) on canonical bounds, clamped at zero.
template <typename T>
inline T standard_kl(const Canon<T>& c, bool flat) {
  T kl;
  if (flat) {
    kl = flat_kl(c.al, c.wd);
  } else {
    kl = std::log(c.wd) - closed_stats(c, false).entropy;
  }
  return clamp_min0(kl);
}

// (dK/dloc, dK/dscale) of _kl_grad.kl_derivatives.
template <typename T>
inline void kl_grads(const Canon<T>& c, bool flat, T scale, T& d_loc, T& d_scale) {
  const T al = c.al, be = c.be, wd = c.wd;
  T half_cov, half_var;
  if (flat) {
    flat_halves(al, wd, half_cov, half_var);
  } else {
    T a, b, y1, y2;
    if (c.tail) {
      // _tail_terms.
      const TailZ<T> t = tail_log_zhat(al, be, wd);
      T r, da, db;
      gap_from_erfcx(al, t.ea, r, da);
      gap_from_erfcx(be, t.eb, r, db);
      const T ua = mills_gap_complement(al, da);
      const T ub = mills_gap_complement(be, db);
      const T w2 = T(2) * t.w;
      const T x = (t.ea * ua - t.q_eb * (ub - w2)) / t.d;
      a = Consts<T>::sqrt_2_over_pi / t.d;
      b = Consts<T>::sqrt_2_over_pi * std::exp(-t.w) / t.d;
      y1 = -x;
      y2 = w2 + x;
    } else {
      // _straddle_terms.
      const T an = nonpositive(al);
      const T z = straddle_z(an, be);
      a = normal_pdf(an) / z;
      b = normal_pdf(be) / z;
      const T tt = an * a - be * b;
      y1 = tt - an * an - T(1);
      y2 = be * be + T(1) - tt;
    }
    half_cov = T(-0.5) * (a * y1 + b * y2);
    half_var = T(1) - T(0.5) * (al * a * y1 + be * b * y2);
  }
  d_loc = -c.sign * half_cov / scale;
  d_scale = -half_var / scale;
}

// One element: the KL and, when d_loc is given, its derivatives.
template <typename T>
inline void kl_one(T m, T s, T lo, T hi, T qlo, T qhi, T* out, T* d_loc, T* d_scale) {
  const Canon<T> c = canonical((lo - m) / s, (hi - m) / s, (hi - lo) / s);
  const bool flat = is_flat(c.al, c.be, c.wd);
  const T total = standard_kl(c, flat) + (std::log(qhi - qlo) - std::log(hi - lo));
  const bool nested = (qlo <= lo) && (hi <= qhi);
  *out = nested ? clamp_min0(total) : std::numeric_limits<T>::infinity();
  if (d_loc == nullptr) return;
  // torch.where(nested, kl.clamp(min=0), inf) passes the gradient where nested and total >= 0
  // only.
  if (nested && total >= T(0)) {
    kl_grads(c, flat, s, *d_loc, *d_scale);
  } else {
    *d_loc = T(0);
    *d_scale = T(0);
  }
}

template <typename T>
void kl_kernel(const Broadcast& bc, const T* loc, const T* scale, const T* low, const T* high,
               const T* q_low, const T* q_high, T* out, T* d_loc, T* d_scale) {
  at::parallel_for(0, bc.numel, 1024, [&](int64_t begin, int64_t end) {
    bc.for_range<6>(begin, end, [&](int64_t i, const int64_t* o) {
      kl_one(loc[o[0]], scale[o[1]], low[o[2]], high[o[3]], q_low[o[4]], q_high[o[5]], out + i,
             d_loc == nullptr ? nullptr : d_loc + i, d_scale == nullptr ? nullptr : d_scale + i);
    });
  });
}

#ifdef PYRO_SBP_SIMD
// kl_kernel<float>, eight lanes at a time: each block's straddling and tail elements run the
// closed forms (standard_kl's and kl_grads') on their own lane lists, the nearly flat ones the
// quadrature of flat_kl and flat_halves.
void kl_kernel_simd(const Broadcast& bc, const float* loc, const float* scale, const float* low,
                    const float* high, const float* q_low, const float* q_high, float* out,
                    float* d_loc, float* d_scale) {
  using namespace simd;
  const bool grads = d_loc != nullptr;
  at::parallel_for(0, bc.numel, 2048, [&](int64_t begin, int64_t end) {
    Walker<6> w(bc.shape, bc.strides, begin);
    alignas(32) float p[6][kBlock];
    alignas(32) float alpha[kBlock], beta[kBlock], width[kBlock], kl[kBlock], res[kBlock];
    alignas(32) float hc[kBlock], hv[kBlock], res_l[kBlock], res_s[kBlock];
    const float* src[6] = {loc, scale, low, high, q_low, q_high};
    CanonBlock cb;
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, end - b0));
      load_block(w, src, n, p);
      standardise(p, n, 0, alpha, beta, width);
      cb.set(alpha, beta, width, n, Flat::kSplit);
      for_lanes(cb.tail, [&](int j, __m256i ix) {
        const V al = gather(cb.al, ix), be = gather(cb.be, ix), wd = gather(cb.wd, ix);
        const TailZV t = tail_log_zhat(al, be, wd);
        const V ea = t.a.e, da = t.a.d, db = t.b.d;
        const V ent = (al * ea * da - t.q_eb * (be * db + wd * (be + al))) / t.d;
        const V entropy = V(C::half_log_2pi_e) + t.log_zhat + V(0.5f) * ent;
        scatter(kl, cb.tail, j, clamp_min0(log(wd) - entropy));
        if (!grads) return;
        // _tail_terms.
        const V w2 = V(2.0f) * t.w;
        const V x = (ea * t.a.u - t.q_eb * (t.b.u - w2)) / t.d;
        const V a = V(C::sqrt_2_over_pi) / t.d;
        const V b = V(C::sqrt_2_over_pi) * exp(-t.w) / t.d;
        const V y1 = -x, y2 = w2 + x;
        scatter(hc, cb.tail, j, V(-0.5f) * (a * y1 + b * y2));
        scatter(hv, cb.tail, j, V(1.0f) - V(0.5f) * (al * a * y1 + be * b * y2));
      });
      for_lanes(cb.straddle, [&](int j, __m256i ix) {
        const V al = gather(cb.al, ix), be = gather(cb.be, ix), wd = gather(cb.wd, ix);
        const V an = nonpositive(al);
        const V z = straddle_z(an, be);
        const V pa = normal_pdf(an), pb = normal_pdf(be);
        const V ent = (an * pa - be * pb) / z;
        const V entropy = V(C::half_log_2pi_e) + log(z) + V(0.5f) * ent;
        scatter(kl, cb.straddle, j, clamp_min0(log(wd) - entropy));
        if (!grads) return;
        // _straddle_terms.
        const V a = pa / z, b = pb / z;
        const V tt = an * a - be * b;
        const V y1 = tt - an * an - V(1.0f), y2 = be * be + V(1.0f) - tt;
        scatter(hc, cb.straddle, j, V(-0.5f) * (a * y1 + b * y2));
        scatter(hv, cb.straddle, j, V(1.0f) - V(0.5f) * (al * a * y1 + be * b * y2));
      });
      for (int j = 0; j < cb.flat.n; ++j) {
        const int k = cb.flat.idx[j];
        kl[k] = clamp_min0(flat_kl(cb.al[k], cb.wd[k]));
        if (grads) flat_halves(cb.al[k], cb.wd[k], hc[k], hv[k]);
      }
      for (int i = 0; i < n; i += kLanes) {
        const V lo = V::load(p[2] + i), hi = V::load(p[3] + i);
        const V qlo = V::load(p[4] + i), qhi = V::load(p[5] + i);
        const V total = V::load(kl + i) + (log(qhi - qlo) - log(hi - lo));
        const M nested = (qlo <= lo) & (hi <= qhi);
        select(nested, clamp_min0(total), V(std::numeric_limits<float>::infinity()))
            .store(res + i);
        if (!grads) continue;
        // torch.where(nested, kl.clamp(min=0), inf) passes the gradient where nested and
        // total >= 0 only.
        const M pass = nested & (total >= V(0.0f));
        const V s = V::load(p[1] + i);
        const V gl = -V::load(cb.sign + i) * V::load(hc + i) / s;
        const V gs = -V::load(hv + i) / s;
        select(pass, gl, V(0.0f)).store(res_l + i);
        select(pass, gs, V(0.0f)).store(res_s + i);
      }
      std::copy(res, res + n, out + b0);
      if (grads) {
        std::copy(res_l, res_l + n, d_loc + b0);
        std::copy(res_s, res_s + n, d_scale + b0);
      }
    }
  });
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> tn_kl_uniform(
    const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& low, const at::Tensor& high,
    const at::Tensor& q_low, const at::Tensor& q_high, bool need_grad) {
  const std::vector<at::Tensor> params{loc, scale, low, high, q_low, q_high};
  for (const auto& p : params) {
    TORCH_CHECK(p.device().is_cpu(), "tn_kl_uniform: CPU tensors only");
  }
  const Broadcast bc(params);
  auto out = at::empty(bc.shape, loc.options());
  at::Tensor d_loc, d_scale;
  if (need_grad) {
    d_loc = at::empty(bc.shape, loc.options());
    d_scale = at::empty(bc.shape, loc.options());
  }
#ifdef PYRO_SBP_SIMD
  if (loc.scalar_type() == at::kFloat) {
    kl_kernel_simd(bc, loc.data_ptr<float>(), scale.data_ptr<float>(), low.data_ptr<float>(),
                   high.data_ptr<float>(), q_low.data_ptr<float>(), q_high.data_ptr<float>(),
                   out.data_ptr<float>(), need_grad ? d_loc.data_ptr<float>() : nullptr,
                   need_grad ? d_scale.data_ptr<float>() : nullptr);
    if (!need_grad) {
      d_loc = at::empty({0}, loc.options());
      d_scale = d_loc;
    }
    return {out, d_loc, d_scale};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(loc.scalar_type(), "tn_kl_uniform", [&] {
    kl_kernel<scalar_t>(bc, loc.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                        low.data_ptr<scalar_t>(), high.data_ptr<scalar_t>(),
                        q_low.data_ptr<scalar_t>(), q_high.data_ptr<scalar_t>(),
                        out.data_ptr<scalar_t>(),
                        need_grad ? d_loc.data_ptr<scalar_t>() : nullptr,
                        need_grad ? d_scale.data_ptr<scalar_t>() : nullptr);
  });
  if (!need_grad) {
    d_loc = at::empty({0}, loc.options());
    d_scale = d_loc;
  }
  return {out, d_loc, d_scale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyro_sbp, m) {
  m.def(
      "tn_kl_uniform(Tensor loc, Tensor scale, Tensor low, Tensor high, Tensor q_low, "
      "Tensor q_high, bool need_grad) -> (Tensor kl, Tensor d_loc, Tensor d_scale)");
}

TORCH_LIBRARY_IMPL(pyro_sbp, CPU, m) { m.impl("tn_kl_uniform", TORCH_FN(tn_kl_uniform)); }

}  // namespace pyro_sbp
