// The float32 statistics of common.h on eight lanes, and the lane lists that let each formula run
// on the elements that take it only.
//
// Each function is the lane-wise counterpart of the scalar one of the same name in common.h
// (T = float: its thresholds, branch points and clamps); a branch the scalar code takes with an
// `if` is a select here, and the kernels call a branch's formula on lanes that take it only
// (Lanes), so that no work is wasted and no value of an unused branch is kept.
#pragma once

#include "common.h"
#include "simd.h"

#ifdef PYRO_SBP_SIMD

#include <cstdint>

namespace pyro_sbp {
namespace simd {

using C = Consts<float>;

// Elements are processed in blocks of kBlock: loaded into local arrays, sorted into lane lists by
// the formula they take, and each list run kLanes at a time.
constexpr int kBlock = 256;

// The positions in a block of the elements that take one formula; the list is padded to whole
// vectors with copies of its first position, whose results are never stored.
struct Lanes {
  int n = 0;
  alignas(32) int32_t idx[kBlock + kLanes];

  void clear() { n = 0; }
  // Appends the positions base + k of the set bits k of mask.
  void add(int base, int mask) {
    while (mask != 0) {
      const int k = __builtin_ctz(mask);
      idx[n++] = base + k;
      mask &= mask - 1;
    }
  }
  void pad() {
    const int end = (n + kLanes - 1) / kLanes * kLanes;
    for (int j = n; j < end; ++j) idx[j] = idx[0];
  }
  __m256i at(int j) const { return _mm256_load_si256(reinterpret_cast<const __m256i*>(idx + j)); }
};

inline V gather(const float* a, __m256i idx) { return _mm256_i32gather_ps(a, idx, 4); }

// a[idx[j + k]] = v[k] for the lanes k < count of a list's vector j.
inline void scatter(float* a, const Lanes& l, int j, V v) {
  alignas(32) float t[kLanes];
  v.store(t);
  const int count = l.n - j < kLanes ? l.n - j : kLanes;
  for (int k = 0; k < count; ++k) a[l.idx[j + k]] = t[k];
}

// Calls f(j, positions) for each vector of a list (none when it is empty).
template <typename F>
inline void for_lanes(Lanes& l, F&& f) {
  if (l.n == 0) return;
  l.pad();
  for (int j = 0; j < l.n; j += kLanes) f(j, l.at(j));
}

inline V nonpositive(V x) { return select(x > V(0.0f), V(0.0f), x); }
inline V clamp_min0(V x) { return select(x < V(0.0f), V(0.0f), x); }

inline V normal_pdf(V x) {
  return exp(max(V(-0.5f) * x * x, V(exp_floor<float>()))) * V(C::inv_sqrt_2pi);
}

inline V normal_cdf_neg(V x) {
  return V(0.5f) * erfc(min(x * V(C::sqrt1_2), V(erfc_cap<float>())));
}

struct CanonV {
  V al, be, wd, sign;
  M tail;
};

inline CanonV canonical(V alpha, V beta, V width) {
  const M flip = (alpha + beta) < V(0.0f);
  CanonV c;
  c.al = select(flip, -beta, alpha);
  c.be = select(flip, -alpha, beta);
  c.wd = width;
  c.sign = select(flip, V(-1.0f), V(1.0f));
  c.tail = c.al > V(0.0f);
  return c;
}

inline M is_flat(V al, V be, V width) {
  const V h = V(0.5f) * width;
  return (V(0.5f) * abs(al + be) * h + V(0.5f) * h * h) < V(near_uniform<float>());
}

// The Mills-ratio quantities at a canonical tail bound y > 0: E = erfcx(y / sqrt 2) (rounded to
// float, and the rest of its double value, e_res), r = sqrt(2/pi) / E, the gap d = r - y and
// its complement u = 1 - y d, as gap_from_erfcx and mills_gap_complement (their asymptotic
// series from their thresholds on).
// d and u are formed in double from the unrounded E: they lose y^2 and y^2 again to
// cancellation, so that float roundings of E (half an ulp, in whichever direction) would be
// amplified y^4-fold into the tail statistics (the truncated variance above all).
struct GapV {
  V e, e_res, r, d, u;
};

inline V gap_series4(V y2) {
  static const float c[4] = {-74.0f, 10.0f, -2.0f, 1.0f};
  return horner(y2, c);
}

inline V gap_series_from1(V y2) {
  static const float c[10] = {12277827850.0f, -576037442.0f, 29752066.0f, -1708394.0f,
                              110410.0f,      -8162.0f,      706.0f,      -74.0f,
                              10.0f,          -2.0f};
  return horner(y2, c);
}

// With gaps false, only E and its residual.
inline GapV tail_gap(V y, bool gaps = true) {
  // E from y / sqrt 2 formed in double: its float rounding alone would move d by y eps.
  const V x = y * V(C::sqrt1_2);
  GapV g;
  D ylo, yhi, e[2];
  widen(y, ylo, yhi);
  const __m256d cap = _mm256_set1_pd(1e6);
  e[0] = erfcx(D(_mm256_min_pd((ylo * D(Consts<double>::sqrt1_2)).v, cap)));
  e[1] = erfcx(D(_mm256_min_pd((yhi * D(Consts<double>::sqrt1_2)).v, cap)));
  const V near = narrow(e[0], e[1]);
  D nlo, nhi;
  widen(near, nlo, nhi);
  const M far = x > V(1e6f);
  g.e = select(far, V(0.56418958354775628695f) / x, near);
  g.e_res = select(far, V(0.0f), narrow(e[0] - nlo, e[1] - nhi));
  if (!gaps) return g;
  const D c = Consts<double>::sqrt_2_over_pi;
  const D rlo = c / e[0], rhi = c / e[1];
  const D dlo = rlo - ylo, dhi = rhi - yhi;
  g.r = select(far, V(C::sqrt_2_over_pi) / g.e, narrow(rlo, rhi));
  g.d = narrow(dlo, dhi);
  g.u = narrow(D(1.0) - ylo * dlo, D(1.0) - yhi * dhi);
  const M series_u = y >= V(8.0f);
  if (!any(series_u)) return g;
  const V inv = V(1.0f) / y;
  const V inv2 = inv * inv;
  g.d = select(y < V(series_threshold<float>()), g.d, inv * gap_series4(inv2));
  g.u = select(series_u, -inv2 * gap_series_from1(inv2), g.u);
  return g;
}

struct TailZV {
  V log_zhat, d, w, q_eb;
  GapV a, b;
};

// With gaps false, log Zhat only (t.q_eb and the gaps of t.a and t.b are not set).
inline TailZV tail_log_zhat(V al, V be, V width, bool gaps = true) {
  TailZV t;
  t.a = tail_gap(al, gaps);
  t.b = tail_gap(be, gaps);
  t.w = V(0.5f) * width * (be + al);
  // E_alpha - E_beta from the unrounded erfcx values: exact where they are close, instead of
  // their float roundings' difference, which a narrow interval amplifies.
  t.d = ((t.a.e - t.b.e) + (t.a.e_res - t.b.e_res)) - t.b.e * expm1(-t.w);
  if (gaps) t.q_eb = exp(-t.w) * t.b.e;
  t.log_zhat = log(V(0.5f) * t.d);
  return t;
}

inline V straddle_z(V al, V be) {
  return V(0.5f) * (erf(be * V(C::sqrt1_2)) - erf(nonpositive(al) * V(C::sqrt1_2)));
}


struct StatsV {
  V log_zhat, entropy, mean, var;
};

inline StatsV tail_stats(V al, V be, V width, bool need_var) {
  const TailZV t = tail_log_zhat(al, be, width);
  const V ea = t.a.e, da = t.a.d, db = t.b.d;
  StatsV s;
  s.log_zhat = t.log_zhat;
  const V ent = (al * ea * da - t.q_eb * (be * db + width * (be + al))) / t.d;
  s.entropy = V(C::half_log_2pi_e) + t.log_zhat + V(0.5f) * ent;
  s.mean = (ea * da - t.q_eb * (db + width)) / t.d;
  s.var = V(0.0f);
  if (need_var) {
    const V v = (ea * t.a.u - t.q_eb * (V(1.0f) + (be - V(2.0f) * al) * db + width * width)) / t.d -
                s.mean * s.mean;
    s.var = clamp_min0(v);
  }
  return s;
}

inline StatsV straddle_stats(V al, V be, bool need_var) {
  al = nonpositive(al);
  const V z = straddle_z(al, be);
  const V pa = normal_pdf(al);
  const V pb = normal_pdf(be);
  const V ent = (al * pa - be * pb) / z;
  StatsV s;
  s.log_zhat = log(z);
  s.entropy = V(C::half_log_2pi_e) + s.log_zhat + V(0.5f) * ent;
  s.mean = (pa - pb) / z;
  s.var = need_var ? clamp_min0(V(1.0f) + ent - s.mean * s.mean) : V(0.0f);
  return s;
}

// What CanonBlock::set does with the nearly flat elements: nothing (they stay in the tail and
// straddle lists), list them apart (leaving those lists), or list them and keep them there too.
enum class Flat { kIgnore, kSplit, kAlsoList };

// Canonical bounds of a block's elements, kept as arrays, with the lists of their tail and
// straddling elements and, as asked (Flat), of the nearly flat ones.
struct CanonBlock {
  alignas(32) float al[kBlock], be[kBlock], wd[kBlock], sign[kBlock];
  Lanes tail, straddle, flat;

  // From the standardised bounds of n elements (arrays padded to whole vectors).
  void set(const float* alpha, const float* beta, const float* width, int n, Flat mode) {
    tail.clear();
    straddle.clear();
    flat.clear();
    for (int i = 0; i < n; i += kLanes) {
      const CanonV c = canonical(V::load(alpha + i), V::load(beta + i), V::load(width + i));
      c.al.store(al + i);
      c.be.store(be + i);
      c.wd.store(wd + i);
      c.sign.store(sign + i);
      const int valid = n - i >= kLanes ? 0xff : (1 << (n - i)) - 1;
      const int fl = mode == Flat::kIgnore ? 0 : bits(is_flat(c.al, c.be, c.wd)) & valid;
      const int out = mode == Flat::kSplit ? fl : 0;
      const int tl = bits(c.tail) & valid & ~out;
      tail.add(i, tl);
      straddle.add(i, valid & ~tl & ~out);
      flat.add(i, fl);
    }
  }
};

// log Zhat by the closed forms (closed_log_zhat) of a block's canonical bounds, into out.
inline void closed_log_zhat(CanonBlock& c, float* out) {
  for_lanes(c.tail, [&](int j, __m256i ix) {
    scatter(out, c.tail, j,
            tail_log_zhat(gather(c.al, ix), gather(c.be, ix), gather(c.wd, ix), false).log_zhat);
  });
  for_lanes(c.straddle, [&](int j, __m256i ix) {
    scatter(out, c.straddle, j, log(straddle_z(gather(c.al, ix), gather(c.be, ix))));
  });
}

// Pads a block array of n elements to whole vectors with copies of its first element.
inline void pad(float* a, int n) {
  const int end = (n + kLanes - 1) / kLanes * kLanes;
  for (int k = n; k < end; ++k) a[k] = a[0];
}

// Reads the next n elements of N strided parameters (at w's positions) into block arrays p[q],
// padded.
template <int N>
inline void load_block(Walker<N>& w, const float* const* src, int n, float (*p)[kBlock]) {
  for (int k = 0; k < n; ++k) {
    for (int q = 0; q < N; ++q) p[q][k] = src[q][w.off[q]];
    w.next();
  }
  for (int q = 0; q < N; ++q) pad(p[q], n);
}

// The standardised bounds of a block from p[0..3] = (loc, scale, low, high): alpha and beta of
// the normal tilted by e^(tilt x) (shifted by tilt scale), and the width.
inline void standardise(float (*p)[kBlock], int n, int tilt, float* alpha, float* beta,
                        float* width) {
  for (int i = 0; i < n; i += kLanes) {
    const V m = V::load(p[0] + i), s = V::load(p[1] + i);
    const V lo = V::load(p[2] + i), hi = V::load(p[3] + i);
    V a = (lo - m) / s, b = (hi - m) / s;
    if (tilt > 0) {
      const V shift = V(static_cast<float>(tilt)) * s;  // exact: 1 s and 2 s
      a = a - shift;
      b = b - shift;
    }
    a.store(alpha + i);
    b.store(beta + i);
    ((hi - lo) / s).store(width + i);
  }
}

}  // namespace simd
}  // namespace pyro_sbp

#endif  // PYRO_SBP_SIMD
