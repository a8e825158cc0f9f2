// Scalar numerics of the standard normal truncated to [alpha, beta], shared by the kernels.
//
// Each function is the element-wise counterpart of the one named in its comment in
// pyro_sbp/distributions/_standard.py, with the same formulas, branch points and clamps, so that
// the native kernels and the PyTorch path agree to rounding. T is float or double; the kernels
// compute in the tensors' own dtype, as the PyTorch path does.
#pragma once

#include <ATen/native/Math.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace pyro_sbp {

template <typename T>
struct Consts {
  static constexpr T sqrt1_2 = T(0.70710678118654752440);
  static constexpr T sqrt_2_over_pi = T(0.79788456080286535588);
  static constexpr T inv_sqrt_2pi = T(0.39894228040143267794);
  static constexpr T log_sqrt_2pi = T(0.91893853320467274178);
  static constexpr T half_log_2pi_e = T(1.41893853320467274178);
  static constexpr T inv_sqrt_pi = T(0.56418958354775628695);
};

template <typename T>
inline bool is_double() {
  return sizeof(T) == sizeof(double);
}

// _series_threshold: where the Mills-ratio gap switches to its asymptotic series.
template <typename T>
inline T series_threshold() {
  return is_double<T>() ? T(1e3) : T(30.0);
}

// _newton_steps: Newton steps of the far-tail sampler before the final one.
template <typename T>
inline int newton_steps() {
  return is_double<T>() ? 3 : 2;
}

// _ndtr_tail_threshold.
template <typename T>
inline T ndtr_tail_threshold() {
  return T(10.0);
}

// _exp_floor.
template <typename T>
inline T exp_floor() {
  return is_double<T>() ? T(-700.0) : T(-80.0);
}

// _erfc_cap.
template <typename T>
inline T erfc_cap() {
  return is_double<T>() ? T(26.0) : T(9.0);
}

template <typename T>
inline T tiny() {
  return std::numeric_limits<T>::min();
}

template <typename T>
inline T erfcx(T x) {
  return calc_erfcx(x);
}

template <typename T>
inline T ndtri(T p) {
  return calc_ndtri(p);
}

// _gap_series(y2, 0, 4): 1 - 2 y2 + 10 y2^2 - 74 y2^3.
template <typename T>
inline T gap_series4(T y2) {
  T acc = T(-74.0);
  acc = acc * y2 + T(10.0);
  acc = acc * y2 + T(-2.0);
  acc = acc * y2 + T(1.0);
  return acc;
}

// _gap_series(y2, 1, 10): the coefficients from -2 on.
template <typename T>
inline T gap_series_from1(T y2) {
  static const double c[10] = {-2.0,     10.0,      -74.0,      706.0,       -8162.0,
                               110410.0, -1708394.0, 29752066.0, -576037442.0, 12277827850.0};
  T acc = T(c[9]);
  for (int k = 8; k >= 0; --k) acc = acc * y2 + T(c[k]);
  return acc;
}

// mills_gap: d(x) = phi(x) / Phi(-x) - x for x >= 0.
template <typename T>
inline T mills_gap(T x) {
  const T thr = series_threshold<T>();
  if (x < thr) return Consts<T>::sqrt_2_over_pi / erfcx(x * Consts<T>::sqrt1_2) - x;
  const T y = T(1) / x;
  return y * gap_series4(y * y);
}

// _gap_from_erfcx: (r(y), d(y)) given ey = erfcx(y / sqrt 2).
template <typename T>
inline void gap_from_erfcx(T y, T ey, T& r, T& d) {
  r = Consts<T>::sqrt_2_over_pi / ey;
  const T thr = series_threshold<T>();
  if (y < thr) {
    d = r - y;
  } else {
    const T inv = T(1) / y;
    d = inv * gap_series4(inv * inv);
  }
}

// mills_gap_complement: u(x) = 1 - x d(x), given d = d(x).
template <typename T>
inline T mills_gap_complement(T x, T d) {
  const T thr = is_double<T>() ? T(20.0) : T(8.0);
  if (x < thr) return T(1) - x * d;
  const T y = T(1) / x;
  const T y2 = y * y;
  return -y2 * gap_series_from1(y2);
}

// _nonpositive.
template <typename T>
inline T nonpositive(T x) {
  return x > T(0) ? T(0) : x;
}

// _normal_pdf.
template <typename T>
inline T normal_pdf(T x) {
  return std::exp(std::max(T(-0.5) * x * x, exp_floor<T>())) * Consts<T>::inv_sqrt_2pi;
}

// _normal_cdf_neg: Phi(-x) for x >= -cap.
template <typename T>
inline T normal_cdf_neg(T x) {
  return T(0.5) * std::erfc(std::min(x * Consts<T>::sqrt1_2, erfc_cap<T>()));
}

// canonical: the interval mirrored so that its midpoint is >= 0.
template <typename T>
struct Canon {
  T al, be, wd, sign;
  bool tail;
};

template <typename T>
inline Canon<T> canonical(T alpha, T beta, T width) {
  const bool flip = (alpha + beta) < T(0);
  Canon<T> c;
  c.al = flip ? -beta : alpha;
  c.be = flip ? -alpha : beta;
  c.wd = width;
  c.sign = flip ? T(-1) : T(1);
  c.tail = c.al > T(0);
  return c;
}

// _tail_log_zhat: (log Zhat, D, E_alpha, q E_beta, w) on a canonical tail interval.
template <typename T>
struct TailZ {
  T log_zhat, d, ea, eb, q_eb, w;
};

template <typename T>
inline TailZ<T> tail_log_zhat(T al, T be, T width) {
  TailZ<T> t;
  t.ea = erfcx(al * Consts<T>::sqrt1_2);
  t.eb = erfcx(be * Consts<T>::sqrt1_2);
  t.w = T(0.5) * width * (be + al);
  t.d = (t.ea - t.eb) - t.eb * std::expm1(-t.w);
  t.q_eb = std::exp(-t.w) * t.eb;
  t.log_zhat = std::log(T(0.5) * t.d);
  return t;
}

// _straddle_z: Z on a canonical straddling interval (al clamped to <= 0).
template <typename T>
inline T straddle_z(T al, T be) {
  return T(0.5) * (std::erf(be * Consts<T>::sqrt1_2) - std::erf(nonpositive(al) * Consts<T>::sqrt1_2));
}

// _NEAR_UNIFORM.
template <typename T>
inline T near_uniform() {
  return is_double<T>() ? T(0.05) : T(1.0);
}

// _is_flat.
template <typename T>
inline bool is_flat(T al, T be, T width) {
  const T h = T(0.5) * width;
  return (T(0.5) * std::abs(al + be) * h + T(0.5) * h * h) < near_uniform<T>();
}

}  // namespace pyro_sbp

// =================================================================================================
// Added for kl.cpp and moments.cpp: the statistics of _standard.moments / log_zhat /
// kl_to_uniform and _kl_grad's derivative terms, per element, and a strided reader of
// broadcast parameters. Same formulas, evaluation order, branch points and clamps as the
// PyTorch path.
// =================================================================================================

#include <ATen/ATen.h>

#include <vector>

namespace pyro_sbp {

// x.clamp(min=0) as torch computes it (nan stays nan).
template <typename T>
inline T clamp_min0(T x) {
  return x < T(0) ? T(0) : x;
}

// nearest_to_zero: alpha.clamp(min=0) + beta.clamp(max=0).
template <typename T>
inline T nearest_to_zero(T alpha, T beta) {
  return (alpha < T(0) ? T(0) : alpha) + (beta > T(0) ? T(0) : beta);
}

// log_zhat's closed forms (_tail_lz, _straddle_lz) on canonical bounds: no flat branch.
template <typename T>
inline T closed_log_zhat(const Canon<T>& c) {
  if (c.tail) return tail_log_zhat(c.al, c.be, c.wd).log_zhat;
  return std::log(straddle_z(c.al, c.be));
}

// _tail_all / _straddle_all: (log Zhat, entropy, mean offset, variance) on canonical bounds.
template <typename T>
struct Stats {
  T log_zhat, entropy, mean, var;
};

template <typename T>
inline Stats<T> tail_stats(T al, T be, T width, bool need_var) {
  const TailZ<T> t = tail_log_zhat(al, be, width);
  T r, da, db;
  gap_from_erfcx(al, t.ea, r, da);  // mills_gap(al): the same erfcx value, not recomputed
  gap_from_erfcx(be, t.eb, r, db);
  Stats<T> s;
  s.log_zhat = t.log_zhat;
  const T ent = (al * t.ea * da - t.q_eb * (be * db + width * (be + al))) / t.d;
  s.entropy = Consts<T>::half_log_2pi_e + t.log_zhat + T(0.5) * ent;
  s.mean = (t.ea * da - t.q_eb * (db + width)) / t.d;
  s.var = T(0);
  if (need_var) {
    const T ua = mills_gap_complement(al, da);
    const T v = (t.ea * ua - t.q_eb * (T(1) + (be - T(2) * al) * db + width * width)) / t.d -
                s.mean * s.mean;
    s.var = clamp_min0(v);
  }
  return s;
}

template <typename T>
inline Stats<T> straddle_stats(T al, T be, bool need_var) {
  al = nonpositive(al);
  const T z = straddle_z(al, be);
  const T pa = normal_pdf(al);
  const T pb = normal_pdf(be);
  const T ent = (al * pa - be * pb) / z;
  Stats<T> s;
  s.log_zhat = std::log(z);
  s.entropy = Consts<T>::half_log_2pi_e + s.log_zhat + T(0.5) * ent;
  s.mean = (pa - pb) / z;
  s.var = need_var ? clamp_min0(T(1) + ent - s.mean * s.mean) : T(0);
  return s;
}

template <typename T>
inline Stats<T> closed_stats(const Canon<T>& c, bool need_var) {
  return c.tail ? tail_stats(c.al, c.be, c.wd, need_var) : straddle_stats(c.al, c.be, need_var);
}

// _GL_NODES and _GL_WEIGHTS / 2 (8-point Gauss-Legendre on [-1, 1], numpy's leggauss).
constexpr int kGL = 8;
constexpr double kGLNodes[kGL] = {-0.9602898564975362, -0.7966664774136267, -0.525532409916329,
                                  -0.18343464249564978, 0.18343464249564978, 0.525532409916329,
                                  0.7966664774136267,  0.9602898564975362};
constexpr double kGLHalfWeights[kGL] = {0.05061426814518853, 0.11119051722668721,
                                        0.15685332293894344, 0.18134189168918083,
                                        0.18134189168918083, 0.15685332293894344,
                                        0.11119051722668721, 0.05061426814518853};

// _psi: x e^x - e^x + 1, by its series where it would cancel.
template <typename T>
inline T psi(T x) {
  if (std::abs(x) < T(0.1)) {
    const T inner =
        T(1.0 / 3.0) +
        x * (T(1.0 / 8.0) + x * (T(1.0 / 30.0) + x * (T(1.0 / 144.0) + x / T(840.0))));
    return x * x * (T(0.5) + x * inner);
  }
  return x * std::exp(x) - std::expm1(x);
}

// _flat_quadrature: y = m + h v, g(v) = -(m h v + h^2 v^2 / 2), L = log E_U[e^g].
template <typename T>
struct FlatQuad {
  T m, h, big_l;
  T v[kGL], w[kGL], g[kGL];
};

template <typename T>
inline FlatQuad<T> flat_quadrature(T al, T width) {
  FlatQuad<T> q;
  q.h = T(0.5) * width;
  q.m = al + q.h;
  const T mh = -(q.m * q.h);
  const T hh = T(0.5) * q.h * q.h;
  T acc = T(0);
  for (int k = 0; k < kGL; ++k) {
    q.v[k] = T(kGLNodes[k]);
    q.w[k] = T(kGLHalfWeights[k]);
    q.g[k] = mh * q.v[k] - hh * q.v[k] * q.v[k];
    acc += std::expm1(q.g[k]) * q.w[k];
  }
  q.big_l = std::log1p(acc);
  return q;
}

// _flat_kl.
template <typename T>
inline T flat_kl(T al, T width) {
  const FlatQuad<T> q = flat_quadrature(al, width);
  T kl = T(0);
  for (int k = 0; k < kGL; ++k) kl += psi(q.g[k] - q.big_l) * q.w[k];
  return kl;
}

// _flat_all's variance.
template <typename T>
inline T flat_variance(T al, T width) {
  const FlatQuad<T> q = flat_quadrature(al, width);
  T p[kGL];
  T ev = T(0);
  for (int k = 0; k < kGL; ++k) {
    p[k] = std::exp(q.g[k] - q.big_l) * q.w[k];
    ev += p[k] * q.v[k];
  }
  T acc = T(0);
  for (int k = 0; k < kGL; ++k) {
    const T dv = q.v[k] - ev;
    acc += p[k] * (dv * dv);
  }
  return q.h * q.h * acc;
}

// _kl_grad._flat_halves: (Cov(xi, xi^2) / 2, Var(xi^2) / 2) of the nearly flat interval.
template <typename T>
inline void flat_halves(T al, T width, T& half_cov, T& half_var) {
  const FlatQuad<T> q = flat_quadrature(al, width);
  T p[kGL];
  T ev = T(0), ev2 = T(0);
  for (int k = 0; k < kGL; ++k) {
    p[k] = std::exp(q.g[k] - q.big_l) * q.w[k];
    ev += p[k] * q.v[k];
    ev2 += p[k] * q.v[k] * q.v[k];
  }
  const T mh2 = T(2) * q.m * q.h;
  const T hh = q.h * q.h;
  T cov = T(0), var = T(0);
  for (int k = 0; k < kGL; ++k) {
    const T dv = q.v[k] - ev;
    const T dsq = mh2 * dv + hh * (q.v[k] * q.v[k] - ev2);
    cov += p[k] * q.h * dv * dsq;
    var += p[k] * dsq * dsq;
  }
  half_cov = T(0.5) * cov;
  half_var = T(0.5) * var;
}

// The positions of consecutive elements (row-major over shape) in N strided parameters, advanced
// one element at a time: off[q] is the current element's position in parameter q.
template <int N>
struct Walker {
  const std::vector<int64_t>& shape;
  const std::vector<std::vector<int64_t>>& strides;
  std::vector<int64_t> idx;
  int64_t off[N] = {0};

  Walker(const std::vector<int64_t>& shape_, const std::vector<std::vector<int64_t>>& strides_,
         int64_t begin)
      : shape(shape_), strides(strides_), idx(shape_.size(), 0) {
    int64_t rest = begin;
    for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
      idx[d] = rest % shape[d];
      rest /= shape[d];
      for (int q = 0; q < N; ++q) off[q] += idx[d] * strides[q][d];
    }
  }

  void next() {
    for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
      if (++idx[d] < shape[d]) {
        for (int q = 0; q < N; ++q) off[q] += strides[q][d];
        return;
      }
      for (int q = 0; q < N; ++q) off[q] -= strides[q][d] * (shape[d] - 1);
      idx[d] = 0;
    }
  }
};

// Reads broadcast parameters element by element: the output has the broadcast shape of the
// parameters, each read through its own strides (0 where it broadcasts), nothing copied.
struct Broadcast {
  std::vector<int64_t> shape;
  std::vector<std::vector<int64_t>> strides;  // per parameter, aligned to shape
  int64_t numel = 1;

  explicit Broadcast(const std::vector<at::Tensor>& params) {
    std::vector<int64_t> s;
    for (const auto& p : params) s = at::infer_size(s, p.sizes());
    shape = s;
    for (int64_t n : shape) numel *= n;
    const int64_t k = static_cast<int64_t>(shape.size());
    for (const auto& p : params) {
      TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "parameters of mixed dtypes");
      std::vector<int64_t> st(k, 0);
      for (int64_t e = 0; e < p.dim(); ++e) {
        const int64_t d = e + (k - p.dim());
        st[d] = p.size(e) == 1 ? 0 : p.stride(e);
      }
      strides.push_back(st);
    }
  }

  // Calls f(i, offsets) for the elements begin <= i < end (row-major), offsets[q] being the
  // position of element i in parameter q.
  template <int N, typename F>
  void for_range(int64_t begin, int64_t end, F&& f) const {
    Walker<N> w(shape, strides, begin);
    for (int64_t i = begin; i < end; ++i) {
      f(i, w.off);
      w.next();
    }
  }
};

}  // namespace pyro_sbp
