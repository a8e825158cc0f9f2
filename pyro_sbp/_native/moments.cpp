// The truncated log-normal's mean and variance in one pass (forward only).
//
// The element-wise counterpart of pyro_sbp/distributions/truncated_log_normal.py: from the
// parameters of the truncated normal of log(theta) (loc, scale, log low, log high), the shifts of
// _shift, the closed-form log Zhat of the normal and of its tilts by e^x and e^2x (_log_mean,
// _kappa), the tilted variance of _standard.moments (flat case included) where kappa is small;
// mean = min(exp(K(1)), high), variance = exp(2 K(1)) expm1(kappa).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace pyro_sbp {
namespace {

template <typename T>
void moments_kernel(const Broadcast& bc, const T* loc, const T* scale, const T* low,
                    const T* high, T* mean, T* variance) {
  const T switch_at = is_double<T>() ? T(1e-7) : T(1e-3);
  at::parallel_for(0, bc.numel, 512, [&](int64_t begin, int64_t end) {
    bc.for_range<4>(begin, end, [&](int64_t i, const int64_t* o) {
      const T mu = loc[o[0]], sigma = scale[o[1]], lo = low[o[2]], hi = high[o[3]];
      const T alpha = (lo - mu) / sigma;
      const T beta = (hi - mu) / sigma;
      const T width = (hi - lo) / sigma;
      // _shift.
      const T s0 = nearest_to_zero(alpha, beta);
      const T ts2 = T(2) * sigma;
      const T d1 = sigma - (std::min(std::max(sigma, alpha), beta) - s0);
      const T d2 = ts2 - (std::min(std::max(ts2, alpha), beta) - s0);
      // log Zhat of the normal and of its tilts (log_zhat's closed forms).
      const T lz0 = closed_log_zhat(canonical(alpha, beta, width));
      const Canon<T> c1 = canonical(alpha - sigma, beta - sigma, width);
      const T lz1 = closed_log_zhat(c1);
      const T lz2 = closed_log_zhat(canonical(alpha - ts2, beta - ts2, width));
      // _log_mean.
      const T log_mean = mu + d1 * s0 + T(0.5) * (sigma - d1) * (sigma + d1) + lz1 - lz0;
      // _kappa.
      T exact = (d2 - T(2) * d1) * s0 + sigma * sigma - T(0.5) * (d2 * d2) + d1 * d1;
      exact = exact + (lz2 - lz1) - (lz1 - lz0);
      const T tilted_var = is_flat(c1.al, c1.be, c1.wd) ? flat_variance(c1.al, c1.wd)
                                                         : closed_stats(c1, true).var;
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
