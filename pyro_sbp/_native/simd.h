// Eight float32 lanes (AVX2 + FMA) and the special functions the float kernels need on them.
//
// Compiled only where the compiler targets AVX2 and FMA (pyro_sbp/_native/__init__.py passes
// -mavx2 -mfma on x86-64 CPUs that have them); PYRO_SBP_SIMD says so. The transcendental
// functions are SLEEF's (exported by libtorch_cpu, which PyTorch's own vectorised CPU kernels
// use: exp, log, expm1 within 1 ulp). erfcx, erfc, erf and ndtri are built here (SLEEF lacks
// erfcx and ndtri, and its erf and erfc cost more than glibc's scalar ones); accuracy in their
// comments, tested against scipy in tests/distributions/test_native_simd.py.
//
// min and max follow std::min and std::max operand for operand (a nan in the second operand of
// std::min(a, b) is not returned, in the first it is), so that the vector kernels branch and
// clamp exactly as the scalar ones in common.h.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define PYRO_SBP_SIMD 1

#include <immintrin.h>
#include <sleef.h>

namespace pyro_sbp {
namespace simd {

constexpr int kLanes = 8;

struct M {
  __m256 m;
};

struct V {
  __m256 v;
  V() = default;
  V(__m256 x) : v(x) {}  // NOLINT: implicit, as a number
  V(float x) : v(_mm256_set1_ps(x)) {}  // NOLINT
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};

inline V operator+(V a, V b) { return _mm256_add_ps(a.v, b.v); }
inline V operator-(V a, V b) { return _mm256_sub_ps(a.v, b.v); }
inline V operator*(V a, V b) { return _mm256_mul_ps(a.v, b.v); }
inline V operator/(V a, V b) { return _mm256_div_ps(a.v, b.v); }
inline V operator-(V a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
inline M operator<(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline M operator<=(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
inline M operator>(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
inline M operator>=(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
inline M operator&(M a, M b) { return {_mm256_and_ps(a.m, b.m)}; }
inline M operator|(M a, M b) { return {_mm256_or_ps(a.m, b.m)}; }
inline M operator~(M a) { return {_mm256_xor_ps(a.m, _mm256_castsi256_ps(_mm256_set1_epi32(-1)))}; }
inline M isnan(V a) { return {_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)}; }
inline int bits(M a) { return _mm256_movemask_ps(a.m); }
inline bool any(M a) { return bits(a) != 0; }

// a where m, else b.
inline V select(M m, V a, V b) { return _mm256_blendv_ps(b.v, a.v, m.m); }
// std::min(a, b) = b < a ? b : a; std::max(a, b) = a < b ? b : a.
inline V min(V a, V b) { return _mm256_min_ps(b.v, a.v); }
inline V max(V a, V b) { return _mm256_max_ps(b.v, a.v); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline V sqrt(V a) { return _mm256_sqrt_ps(a.v); }
inline V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
// |a| with the sign of b.
inline V copysign(V a, V b) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return _mm256_or_ps(_mm256_andnot_ps(sign, a.v), _mm256_and_ps(sign, b.v));
}

inline V exp(V a) { return Sleef_expf8_u10avx2(a.v); }
inline V log(V a) { return Sleef_logf8_u10avx2(a.v); }
inline V expm1(V a) { return Sleef_expm1f8_u10avx2(a.v); }

// Horner's rule with the coefficients c[0] (highest power) ... c[n - 1].
template <int N>
inline V horner(V x, const float (&c)[N]) {
  V acc = c[0];
  for (int k = 1; k < N; ++k) acc = fma(acc, x, V(c[k]));
  return acc;
}

// Four double lanes, for erfcx and ndtri.
struct D {
  __m256d v;
  D() = default;
  D(__m256d x) : v(x) {}  // NOLINT
  D(double x) : v(_mm256_set1_pd(x)) {}  // NOLINT
};
inline D operator+(D a, D b) { return _mm256_add_pd(a.v, b.v); }
inline D operator-(D a, D b) { return _mm256_sub_pd(a.v, b.v); }
inline D operator*(D a, D b) { return _mm256_mul_pd(a.v, b.v); }
inline D operator/(D a, D b) { return _mm256_div_pd(a.v, b.v); }
inline D fma(D a, D b, D c) { return _mm256_fmadd_pd(a.v, b.v, c.v); }

template <int N>
inline D horner(D x, const double (&c)[N]) {
  D acc = c[0];
  for (int k = 1; k < N; ++k) acc = fma(acc, x, D(c[k]));
  return acc;
}

// erfcx(x) = exp(x^2) erfc(x) for x >= 0 (nan stays nan; the kernels call it on x >= 0 only),
// evaluated in double and rounded once: the tail formulas subtract nearly equal terms built on it
// (the Mills-ratio gap sqrt(2/pi)/erfcx - x loses x^2), so it must be at least as accurate as
// the scalar path's; rounded once from double it is within half an ulp (and the tail formulas
// use the double value itself, simd_common.h). (1 + 2x) erfcx(x) - 1 is a smooth function of
// q = (x - 2)/(x + 2) on [-1, 1] (the substitution of Schonfelder's Chebyshev expansions); a
// degree-15 polynomial in q, fitted by least squares on Chebyshev nodes against scipy's erfcx,
// has relative error 5e-11 on [0, 1e6]. From 1e6 on, 1/(x sqrt pi) (error below 1e-12).
inline D erfcx(D a) {
  static const double c[16] = {4.308071420298394e-06,  -5.883812014063355e-07,
                               -3.497809847785176e-05, -1.81966922697607e-05,
                               0.00014877654127876965, 0.00021874006739905033,
                               -0.0004528993956086893, -0.001462140388924797,
                               0.001270863982121243,   0.008723931969358965,
                               -0.008033935202854352,  -0.05422015400542776,
                               0.16405127411746215,    -0.1660303905642984,
                               -0.09276382645934814,   0.27697838149884474};
  const D q = (a - D(2.0)) / (a + D(2.0));
  return (D(1.0) + horner(q, c)) / (D(1.0) + D(2.0) * a);
}

// The low and high four lanes of a float vector, in double, and back.
inline void widen(V x, D& lo, D& hi) {
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x.v));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x.v, 1));
}
inline V narrow(D lo, D hi) {
  return _mm256_set_m128(_mm256_cvtpd_ps(hi.v), _mm256_cvtpd_ps(lo.v));
}

// erfcx(x) of float lanes, evaluated in double and rounded once.
inline V erfcx(V x) {
  D lo, hi;
  widen(min(x, V(1e6f)), lo, hi);
  return select(x > V(1e6f), V(0.56418958354775628695f) / x, narrow(erfcx(lo), erfcx(hi)));
}

// erfcx(x) for x >= 0 in float arithmetic, within 2 ulp (1.2e-7 relative; measured against
// scipy) on [0, 1e6]: for erf and erfc, whose results are not amplified by a cancellation. The
// same substitution as above, a degree-12 polynomial in q fitted for float, with q and the final
// division corrected by one fma each (the rounding of (x - 2)/(x + 2) is otherwise amplified).
inline V erfcx_float(V x) {
  static const float c[13] = {-2.024693094426766e-05f, 6.337399099720642e-05f,
                              2.215466374764219e-04f,  -3.579317708499730e-04f,
                              -1.464045490138233e-03f, 1.217420795001090e-03f,
                              8.724595420062542e-03f,  -8.018966764211655e-03f,
                              -5.422026291489601e-02f, 1.640494614839554e-01f,
                              -1.660303771495819e-01f, -9.276375919580460e-02f,
                              2.769783735275269e-01f};
  const V a = min(x, V(1e6f));
  const V r = V(1.0f) / (a + V(2.0f));
  V q = (a - V(2.0f)) * r;
  q = fma(r, fma(q, -a, fma(q + V(1.0f), V(-2.0f), a)), q);
  const V p = horner(q, c);
  // (1 + p) / (1 + 2a), with its residual.
  const V h = V(0.5f) / (a + V(0.5f));
  const V y = fma(p, h, h);
  const V e = (p - y) + fma(y + y, -a, V(1.0f));
  return select(x > V(1e6f), V(0.56418958354775628695f) / x, fma(e, h, y));
}

// exp(-x^2) for x >= 0, with x^2 = h + l split exactly (l by an fma), so that the rounding of
// x^2 does not enter exp's argument: exp(-h) (1 - l).
inline V exp_neg_square(V x) {
  const V h = x * x;
  const V l = fma(x, x, -h);
  return exp(-h) * (V(1.0f) - l);
}

// erfc(x) = exp(-x^2) erfcx(|x|), and 2 - that below zero: within 2 ulp, 2.5 where exp(-x^2)
// is far below 1 (measured against scipy).
inline V erfc(V x) {
  const V a = abs(x);
  const V e = exp_neg_square(a) * erfcx_float(a);
  return select(x < V(0.0f), V(2.0f) - e, e);
}

// erf(x): its Taylor series (seven terms, truncation below 3e-8 relative) for |x| < 1/2, else
// sign(x) (1 - erfc(|x|)), which is sign(x) in float from |x| = 4 on (erfc(4) = 1.5e-8 is below
// half an ulp of 1): those lanes skip erfc.
inline V erf(V x) {
  const V a = abs(x);
  const M small = a < V(0.5f);
  const M saturated = a >= V(4.0f);
  if (bits(saturated) == 0xff) return copysign(V(1.0f), x);
  V series = 0.0f, large = 0.0f;
  if (any(small)) {
    // 2/sqrt(pi) (-1)^n / (n! (2n + 1)), n = 6 ... 0.
    static const float c[7] = {1.2055332981789664e-04f,  -8.5483270234508520e-04f,
                               5.2239776254421880e-03f,  -2.6866170645131252e-02f,
                               1.1283791670955126e-01f,  -3.7612638903183754e-01f,
                               1.1283791670955126e+00f};
    series = x * horner(x * x, c);
  }
  if (bits(small | saturated) != 0xff) {
    large = V(1.0f) - exp_neg_square(a) * erfcx_float(a);
  }
  large = copysign(select(saturated, V(1.0f), large), x);
  return select(small, series, large);
}

// The lower-half normal quantile, ndtri(p) for 0 < p <= 0.5, by Acklam's rational
// approximations evaluated in double (relative error 1.2e-9 over all float p, measured against
// scipy; the float result is then correctly rounded to within an ulp).
inline D ndtri_lower(D p) {
  static const double a[6] = {-3.969683028665376e+01, 2.209460984245205e+02,
                              -2.759285104469687e+02, 1.383577518672690e+02,
                              -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[6] = {-5.447609879822406e+01, 1.615858368580409e+02,
                              -1.556989798598866e+02, 6.680131188771720e+01,
                              -1.328068155288572e+01, 1.0};
  static const double c[6] = {-7.784894002430293e-03, -3.223964580411365e-01,
                              -2.400758277161838e+00, -2.549732539343734e+00,
                              4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[5] = {7.784695709041462e-03, 3.224671290700398e-01,
                              2.445134137142996e+00, 3.754408661907416e+00, 1.0};
  const __m256d tail = _mm256_cmp_pd(p.v, _mm256_set1_pd(0.02425), _CMP_LT_OQ);
  const int mask = _mm256_movemask_pd(tail);
  D central = 0.0, lower = 0.0;
  if (mask != 0xf) {
    const D q = p - D(0.5);
    const D r = q * q;
    central = horner(r, a) * q / horner(r, b);
  }
  if (mask != 0) {
    const D pt = _mm256_min_pd(p.v, _mm256_set1_pd(0.02425));
    const D q = _mm256_sqrt_pd((D(-2.0) * D(Sleef_logd4_u10avx2(pt.v))).v);
    lower = horner(q, c) / horner(q, d);
  }
  return _mm256_blendv_pd(central.v, lower.v, tail);
}

// ndtri(p) for 0 < p <= 0.5 in float lanes (the kernels' p: the smaller of a mass and its
// complement, or a tail mass, at least the smallest normal float).
inline V ndtri_lower(V p) {
  D lo, hi;
  widen(p, lo, hi);
  return narrow(ndtri_lower(lo), ndtri_lower(hi));
}

}  // namespace simd
}  // namespace pyro_sbp

#endif  // __AVX2__ && __FMA__
