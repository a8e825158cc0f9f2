// What this build of the kernels is (the float32 lanes per vector instruction: 8 where simd.h is
// compiled in, else 1), and simd.h's special functions on a float tensor, for their tests.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "simd.h"

namespace pyro_sbp {
namespace {

int64_t float_lanes() {
#ifdef PYRO_SBP_SIMD
  return 8;
#else
  return 1;
#endif
}

// name(x) element-wise by simd.h: "erfcx", "erfc", "erf" or "ndtri_lower".
at::Tensor simd_special(const at::Tensor& x, const std::string& name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "simd_special: float CPU");
#ifdef PYRO_SBP_SIMD
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t n = in.numel();
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < n; i += simd::kLanes) {
    alignas(32) float buf[simd::kLanes];
    const int64_t m = n - i < simd::kLanes ? n - i : simd::kLanes;
    for (int k = 0; k < simd::kLanes; ++k) buf[k] = src[i + (k < m ? k : 0)];
    const simd::V v = simd::V::load(buf);
    simd::V r;
    if (name == "erfcx") {
      r = simd::erfcx(v);
    } else if (name == "erfc") {
      r = simd::erfc(v);
    } else if (name == "erf") {
      r = simd::erf(v);
    } else if (name == "ndtri_lower") {
      r = simd::ndtri_lower(v);
    } else {
      TORCH_CHECK(false, "simd_special: unknown function ", name);
    }
    r.store(buf);
    for (int64_t k = 0; k < m; ++k) dst[i + k] = buf[k];
  }
  return out.view(x.sizes());
#else
  TORCH_CHECK(false, "simd_special: this build has no vector kernels");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyro_sbp, m) {
  m.def("float_lanes() -> int");
  m.def("simd_special(Tensor x, str name) -> Tensor");
  m.impl("float_lanes", TORCH_FN(float_lanes));
}

TORCH_LIBRARY_IMPL(pyro_sbp, CPU, m) { m.impl("simd_special", TORCH_FN(simd_special)); }

}  // namespace pyro_sbp
