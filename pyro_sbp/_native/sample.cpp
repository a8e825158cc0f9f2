// Reparameterised samples of the truncated (log-)normal and their derivatives, in one pass.
//
// The element-wise counterpart of pyro_sbp/distributions/_implicit.py (forward: the sampler of
// _standard.sample_offset with exact_quantile=False, canonical frame; backward:
// _sample_derivatives). Everything that depends on the parameters alone (the mirror, the branch,
// the normalisers, the Mills ratios at the bounds) is computed once per unit; each sample then
// takes its unit's branch with an `if`, not every branch with a select.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"
#include "layout.h"
#include "simd_common.h"

namespace pyro_sbp {
namespace {

enum Kind { kStraddle = 0, kTailModerate = 1, kTailFar = 2 };

template <typename T>
struct Unit {
  Canon<T> c;
  Kind kind;
  T p_below, q_above, z;  // straddle: Phi(al), Phi(-be), Z
  T ea, rho, log_q;       // tail: erfcx(al / sqrt 2), Phi(-be) / Phi(-al), log Phi(-al)
  T r_a, d_a, r_b, d_b;   // tail: Mills ratios and gaps at the bounds (for the derivatives)
  T center, scale, low, high, elow, ehigh;
};

template <typename T>
Unit<T> make_unit(T loc, T scale, T low, T high, T elow, T ehigh) {
  Unit<T> n;
  const T alpha = (low - loc) / scale;
  const T beta = (high - loc) / scale;
  const T width = (high - low) / scale;
  n.c = canonical(alpha, beta, width);
  n.center = std::min(std::max(loc, low), high);
  n.scale = scale;
  n.low = low;
  n.high = high;
  n.elow = elow;
  n.ehigh = ehigh;
  if (!n.c.tail) {
    n.kind = kStraddle;
    const T al = nonpositive(n.c.al);
    n.z = straddle_z(al, n.c.be);
    n.p_below = normal_cdf_neg(-al);
    n.q_above = normal_cdf_neg(n.c.be);
    return n;
  }
  n.kind = n.c.al < ndtr_tail_threshold<T>() ? kTailModerate : kTailFar;
  const TailZ<T> t = tail_log_zhat(n.c.al, n.c.be, n.c.wd);
  n.ea = t.ea;
  n.rho = t.q_eb / t.ea;
  n.log_q = std::log(normal_cdf_neg(std::min(n.c.al, ndtr_tail_threshold<T>())));
  gap_from_erfcx(n.c.al, t.ea, n.r_a, n.d_a);
  gap_from_erfcx(n.c.be, t.eb, n.r_b, n.d_b);
  return n;
}

// _tail_excess's Newton branch: the excess z >= 0 with log(Phi(-a - z) / Phi(-a)) = log p.
template <typename T>
T newton_excess(T a, T ea, T lp) {
  T z = T(-2) * lp / (a + std::sqrt(a * a - T(2) * lp));
  // The steps without gradients, then the one taken with them in the PyTorch path.
  for (int k = 0; k <= newton_steps<T>(); ++k) {
    const T ey = erfcx((a + z) * Consts<T>::sqrt1_2);
    const T g = std::log(ey / ea) - T(0.5) * z * (T(2) * a + z) - lp;
    const T slope = Consts<T>::sqrt_2_over_pi / ey;
    z = std::max(z + g / slope, T(0));
  }
  return z;
}

// One sample at uniform u_in of unit n: its value, and its derivatives when d_loc is given.
template <typename T>
inline void sample_one(const Unit<T>& n, T u_in, bool log_space, T* out, T* d_loc, T* d_scale) {
  const T u_min = tiny<T>();
  const T u_max = T(1) - std::numeric_limits<T>::epsilon() / T(2);
  const T u = std::min(std::max(u_in, u_min), u_max);
  const T ubar = T(1) - u;
  T off;
  if (n.kind == kStraddle) {
    const T p_low = n.p_below + u * n.z;
    const T p_high = n.q_above + ubar * n.z;
    const T p = std::max(std::min(p_low, p_high), tiny<T>());
    off = std::copysign(ndtri(p), p_low - p_high);
  } else {
    const T log_p = std::log(ubar + u * n.rho);
    if (n.kind == kTailModerate) {
      const T p = std::max(std::exp(n.log_q + log_p), tiny<T>());
      off = std::max(-ndtri(p) - n.c.al, T(0));
    } else {
      off = newton_excess(n.c.al, n.ea, log_p);
    }
  }
  const T x = std::min(std::max(n.center + n.scale * (n.c.sign * off), n.low), n.high);
  T value = x;
  if (log_space) value = std::min(std::max(std::exp(x), n.elow), n.ehigh);
  *out = value;
  if (d_loc == nullptr) return;
  T dl, ds;
  const T al = n.c.al, be = n.c.be;
  if (n.kind == kStraddle) {
    const T xi = off;
    const T g_alpha = std::exp(std::log(ubar) + T(0.5) * (xi - al) * (xi + al));
    const T g_beta = std::exp(std::log(u) - T(0.5) * (be - xi) * (be + xi));
    dl = T(1) - g_alpha - g_beta;
    ds = xi - al * g_alpha - be * g_beta;
  } else {
    const T z = std::max(off, T(0));
    const T y = al + z;
    T r_y, d_y;
    gap_from_erfcx(y, erfcx(y * Consts<T>::sqrt1_2), r_y, d_y);
    const T w = u * n.rho / (ubar + u * n.rho);
    const T dz_da = (-z + n.d_a - d_y - w * n.r_a) / r_y;
    const T dz_db = w * n.r_b / r_y;
    dl = (z - n.d_a + d_y + w * (n.d_a - n.d_b - n.c.wd)) / r_y;
    ds = z - al * dz_da - be * dz_db;
  }
  ds = n.c.sign * ds;
  if (log_space) {
    dl = dl * value;
    ds = ds * value;
  }
  *d_loc = dl;
  *d_scale = ds;
}

template <typename T>
void sample_kernel(const std::vector<Unit<T>>& units, const T* u_in, T* out, T* d_loc,
                   T* d_scale, int64_t numel, bool log_space) {
  const int64_t num_units = static_cast<int64_t>(units.size());
  at::parallel_for(0, numel, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      sample_one(units[i % num_units], u_in[i], log_space, out + i,
                 d_loc == nullptr ? nullptr : d_loc + i, d_scale == nullptr ? nullptr : d_scale + i);
    }
  });
}

#ifdef PYRO_SBP_SIMD
// sample_kernel<float> for one block of samples at a time, eight lanes at a time: the
// straddling, moderate-tail and far-tail samples run their formulas (sample_one's) on their own
// lane lists, their derivatives too when d_loc is given. load(b0, n, p) writes the parameters
// (loc, scale, low, high, exp_low, exp_high) of the samples b0 ... b0 + n - 1 into p[0..5],
// padded (pad).
template <typename Load>
void sample_kernel_simd(Load&& load, const float* u_in, float* out, float* d_loc,
                        float* d_scale, int64_t numel, bool log_space) {
  using namespace simd;
  const bool grads = d_loc != nullptr;
  at::parallel_for(0, numel, 2048, [&](int64_t begin, int64_t end) {
    alignas(32) float p[6][kBlock];
    alignas(32) float alpha[kBlock], beta[kBlock], width[kBlock], uu[kBlock], off[kBlock];
    alignas(32) float dl[kBlock], ds[kBlock], res[kBlock], res_l[kBlock], res_s[kBlock];
    CanonBlock cb;
    const V u_min = tiny<float>();
    const V u_max = 1.0f - std::numeric_limits<float>::epsilon() / 2.0f;
    const V thr = ndtr_tail_threshold<float>();
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, end - b0));
      load(b0, n, p);
      std::copy(u_in + b0, u_in + b0 + n, uu);
      pad(uu, n);
      standardise(p, n, 0, alpha, beta, width);
      for (int i = 0; i < n; i += kLanes) min(max(V::load(uu + i), u_min), u_max).store(uu + i);
      cb.set(alpha, beta, width, n, Flat::kIgnore);
      for_lanes(cb.straddle, [&](int j, __m256i ix) {
        const V al = gather(cb.al, ix), be = gather(cb.be, ix);
        const V u = gather(uu, ix), ubar = V(1.0f) - u;
        const V an = nonpositive(al);
        const V z = straddle_z(an, be);
        const V p_low = normal_cdf_neg(-an) + u * z;
        const V p_high = normal_cdf_neg(be) + ubar * z;
        const V pr = max(min(p_low, p_high), V(tiny<float>()));
        const V xi = copysign(ndtri_lower(pr), p_low - p_high);
        scatter(off, cb.straddle, j, xi);
        if (!grads) return;
        const V g_alpha = exp(log(ubar) + V(0.5f) * (xi - al) * (xi + al));
        const V g_beta = exp(log(u) - V(0.5f) * (be - xi) * (be + xi));
        scatter(dl, cb.straddle, j, V(1.0f) - g_alpha - g_beta);
        scatter(ds, cb.straddle, j, xi - al * g_alpha - be * g_beta);
      });
      for_lanes(cb.tail, [&](int j, __m256i ix) {
        const V al = gather(cb.al, ix), be = gather(cb.be, ix), wd = gather(cb.wd, ix);
        const V u = gather(uu, ix), ubar = V(1.0f) - u;
        const GapV ga = tail_gap(al, grads), gb = tail_gap(be, grads);
        const V ea = ga.e, eb = gb.e;
        const V w = V(0.5f) * wd * (be + al);
        const V rho = exp(-w) * eb / ea;
        const V mix = ubar + u * rho;
        const V log_p = log(mix);
        const M moderate = al < thr;
        V x = 0.0f;
        if (any(moderate)) {
          const V log_q = log(normal_cdf_neg(min(al, thr)));
          const V pr = max(exp(log_q + log_p), V(tiny<float>()));
          x = max(-ndtri_lower(pr) - al, V(0.0f));
        }
        if (bits(moderate) != 0xff) {
          // Newton's excess (newton_excess).
          V z = V(-2.0f) * log_p / (al + sqrt(al * al - V(2.0f) * log_p));
          for (int k = 0; k <= newton_steps<float>(); ++k) {
            const V ey = erfcx((al + z) * V(C::sqrt1_2));
            const V g = log(ey / ea) - V(0.5f) * z * (V(2.0f) * al + z) - log_p;
            z = max(z + g / (V(C::sqrt_2_over_pi) / ey), V(0.0f));
          }
          x = select(moderate, x, z);
        }
        scatter(off, cb.tail, j, x);
        if (!grads) return;
        const V z = max(x, V(0.0f));
        const GapV gy = tail_gap(al + z);
        const V wt = u * rho / mix;
        const V dz_da = (-z + ga.d - gy.d - wt * ga.r) / gy.r;
        const V dz_db = wt * gb.r / gy.r;
        scatter(dl, cb.tail, j, (z - ga.d + gy.d + wt * (ga.d - gb.d - wd)) / gy.r);
        scatter(ds, cb.tail, j, z - al * dz_da - be * dz_db);
      });
      for (int i = 0; i < n; i += kLanes) {
        const V m = V::load(p[0] + i), sc = V::load(p[1] + i);
        const V lo = V::load(p[2] + i), hi = V::load(p[3] + i);
        const V sign = V::load(cb.sign + i);
        const V center = min(max(m, lo), hi);
        V x = min(max(center + sc * (sign * V::load(off + i)), lo), hi);
        if (log_space) x = min(max(exp(x), V::load(p[4] + i)), V::load(p[5] + i));
        x.store(res + i);
        if (!grads) continue;
        V gl = V::load(dl + i), gs = sign * V::load(ds + i);
        if (log_space) {
          gl = gl * x;
          gs = gs * x;
        }
        gl.store(res_l + i);
        gs.store(res_s + i);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> tn_rsample(
    const at::Tensor& loc, const at::Tensor& scale, const at::Tensor& low, const at::Tensor& high,
    const at::Tensor& exp_low, const at::Tensor& exp_high, const at::Tensor& u, bool log_space,
    bool need_grad) {
  TORCH_CHECK(u.is_contiguous(), "tn_rsample: u must be contiguous");
  const Layout layout({loc, scale, low, high, exp_low, exp_high}, u.sizes());
  auto out = at::empty_like(u);
  at::Tensor d_loc, d_scale;
  if (need_grad) {
    d_loc = at::empty_like(u);
    d_scale = at::empty_like(u);
  }
#ifdef PYRO_SBP_SIMD
  if (u.scalar_type() == at::kFloat) {
    const std::vector<at::Tensor> ps = {loc, scale, low, high, exp_low, exp_high};
    const float* src[6];
    for (int q = 0; q < 6; ++q) src[q] = ps[q].data_ptr<float>();
    float* lp = need_grad ? d_loc.data_ptr<float>() : nullptr;
    float* sp = need_grad ? d_scale.data_ptr<float>() : nullptr;
    if (layout.num_units == u.numel()) {
      // One sample per unit: the parameters read through their strides, unit by unit.
      sample_kernel_simd(
          [&](int64_t b0, int n, float (*p)[simd::kBlock]) {
            Walker<6> w(layout.unit_shape, layout.strides, b0);
            simd::load_block(w, src, n, p);
          },
          u.data_ptr<float>(), out.data_ptr<float>(), lp, sp, u.numel(), log_space);
    } else {
      const auto params = layout.gather<float>(ps);
      const int64_t units = layout.num_units;
      sample_kernel_simd(
          [&](int64_t b0, int n, float (*p)[simd::kBlock]) {
            int64_t j = b0 % units;
            for (int k = 0; k < n; ++k) {
              for (int q = 0; q < 6; ++q) p[q][k] = params[q][j];
              if (++j == units) j = 0;
            }
            for (int q = 0; q < 6; ++q) simd::pad(p[q], n);
          },
          u.data_ptr<float>(), out.data_ptr<float>(), lp, sp, u.numel(), log_space);
    }
    if (!need_grad) {
      d_loc = at::empty({0}, u.options());
      d_scale = d_loc;
    }
    return {out, d_loc, d_scale};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "tn_rsample", [&] {
    if (layout.num_units == u.numel()) {
      // One sample per unit (independent gates): each unit's constants are used once, so they
      // are computed where they are used, in one pass, and never stored.
      const std::vector<at::Tensor> ps = {loc, scale, low, high, exp_low, exp_high};
      std::vector<const scalar_t*> data;
      for (const auto& p : ps) data.push_back(p.data_ptr<scalar_t>());
      const scalar_t* up = u.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      scalar_t* lp = need_grad ? d_loc.data_ptr<scalar_t>() : nullptr;
      scalar_t* sp = need_grad ? d_scale.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, u.numel(), 2048, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          scalar_t v[6];
          for (int q = 0; q < 6; ++q) v[q] = data[q][layout.offset(q, j)];
          const Unit<scalar_t> n = make_unit(v[0], v[1], v[2], v[3], v[4], v[5]);
          sample_one(n, up[j], log_space, op + j, lp == nullptr ? nullptr : lp + j,
                     sp == nullptr ? nullptr : sp + j);
        }
      });
      return;
    }
    const auto params = layout.gather<scalar_t>({loc, scale, low, high, exp_low, exp_high});
    std::vector<Unit<scalar_t>> units(layout.num_units);
    at::parallel_for(0, layout.num_units, 512, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        units[j] = make_unit(params[0][j], params[1][j], params[2][j], params[3][j],
                             params[4][j], params[5][j]);
      }
    });
    sample_kernel<scalar_t>(units, u.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            need_grad ? d_loc.data_ptr<scalar_t>() : nullptr,
                            need_grad ? d_scale.data_ptr<scalar_t>() : nullptr, u.numel(),
                            log_space);
  });
  if (!need_grad) {
    d_loc = at::empty({0}, u.options());
    d_scale = d_loc;
  }
  return {out, d_loc, d_scale};
}

// (sum of grad * d_loc, sum of grad * d_scale) over the samples of each unit: the backward pass
// of tn_rsample, accumulated in double.
std::tuple<at::Tensor, at::Tensor> tn_unit_grads(const at::Tensor& grad, const at::Tensor& d_loc,
                                                 const at::Tensor& d_scale, int64_t num_units) {
  TORCH_CHECK(d_loc.is_contiguous() && d_scale.is_contiguous(),
              "tn_unit_grads: derivatives must be contiguous");
  TORCH_CHECK(num_units > 0 && d_loc.numel() % num_units == 0, "tn_unit_grads: bad num_units");
  const at::Tensor g =
      grad.sizes() == d_loc.sizes() ? grad.contiguous() : grad.expand(d_loc.sizes()).contiguous();
  auto g_loc = at::empty({num_units}, d_loc.options());
  auto g_scale = at::empty({num_units}, d_loc.options());
  const int64_t rows = d_loc.numel() / num_units;
  AT_DISPATCH_FLOATING_TYPES(d_loc.scalar_type(), "tn_unit_grads", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* lp = d_loc.data_ptr<scalar_t>();
    const scalar_t* sp = d_scale.data_ptr<scalar_t>();
    scalar_t* ol = g_loc.data_ptr<scalar_t>();
    scalar_t* os = g_scale.data_ptr<scalar_t>();
    at::parallel_for(0, num_units, 64, [&](int64_t begin, int64_t end) {
      std::vector<double> al(end - begin, 0.0), as(end - begin, 0.0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t base = r * num_units;
        for (int64_t j = begin; j < end; ++j) {
          const double gv = gp[base + j];
          al[j - begin] += gv * lp[base + j];
          as[j - begin] += gv * sp[base + j];
        }
      }
      for (int64_t j = begin; j < end; ++j) {
        ol[j] = static_cast<scalar_t>(al[j - begin]);
        os[j] = static_cast<scalar_t>(as[j - begin]);
      }
    });
  });
  return {g_loc, g_scale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyro_sbp, m) {
  m.def(
      "tn_rsample(Tensor loc, Tensor scale, Tensor low, Tensor high, Tensor exp_low, "
      "Tensor exp_high, Tensor u, bool log_space, bool need_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "tn_unit_grads(Tensor grad, Tensor d_loc, Tensor d_scale, int num_units) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyro_sbp, CPU, m) {
  m.impl("tn_rsample", TORCH_FN(tn_rsample));
  m.impl("tn_unit_grads", TORCH_FN(tn_unit_grads));
}

}  // namespace pyro_sbp
