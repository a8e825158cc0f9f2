// How per-unit parameters map onto the elements of a sample tensor.
//
// The parameters are compact (a plate's expand left out): each broadcasts to the trailing dims of
// the samples' shape. The units are the elements of the shortest trailing block of the samples'
// shape that every parameter spans; element i of the (contiguous) samples belongs to unit
// i % num_units. Each parameter is read through its own strides (0 where it broadcasts), so
// nothing is expanded or copied.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace pyro_sbp {

struct Layout {
  std::vector<int64_t> unit_shape;
  std::vector<std::vector<int64_t>> strides;  // per parameter, aligned to unit_shape
  int64_t num_units = 1;

  Layout(const std::vector<at::Tensor>& params, at::IntArrayRef sample_shape) {
    int64_t k = 0;
    for (const auto& p : params) {
      int64_t lead = 0;
      while (lead < p.dim() && p.size(lead) == 1) ++lead;
      k = std::max(k, p.dim() - lead);
    }
    const int64_t n = static_cast<int64_t>(sample_shape.size());
    TORCH_CHECK(k <= n, "the parameters have more dims than the samples");
    unit_shape.assign(sample_shape.end() - k, sample_shape.end());
    for (int64_t s : unit_shape) num_units *= s;
    for (const auto& p : params) {
      TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "parameters of mixed dtypes");
      std::vector<int64_t> st(k, 0);
      for (int64_t e = 0; e < p.dim(); ++e) {
        const int64_t d = e + (k - p.dim());
        if (d < 0) {
          TORCH_CHECK(p.size(e) == 1, "a parameter does not broadcast to the samples");
          continue;
        }
        TORCH_CHECK(p.size(e) == 1 || p.size(e) == unit_shape[d],
                    "a parameter does not broadcast to the samples");
        st[d] = p.size(e) == 1 ? 0 : p.stride(e);
      }
      strides.push_back(st);
    }
  }

  // The offset of unit j in parameter q (row-major over unit_shape).
  int64_t offset(size_t q, int64_t j) const {
    const auto& st = strides[q];
    int64_t off = 0;
    for (int64_t d = static_cast<int64_t>(unit_shape.size()) - 1; d >= 0; --d) {
      off += (j % unit_shape[d]) * st[d];
      j /= unit_shape[d];
    }
    return off;
  }

  // The parameters' values, unit by unit (one vector per parameter).
  template <typename T>
  std::vector<std::vector<T>> gather(const std::vector<at::Tensor>& params) const {
    std::vector<std::vector<T>> out(params.size(), std::vector<T>(num_units));
    const int64_t k = static_cast<int64_t>(unit_shape.size());
    for (size_t q = 0; q < params.size(); ++q) {
      const T* data = params[q].data_ptr<T>();
      const auto& st = strides[q];
      std::vector<int64_t> idx(k, 0);
      int64_t offset = 0;
      for (int64_t j = 0; j < num_units; ++j) {
        out[q][j] = data[offset];
        // Advance the row-major index over unit_shape, keeping the offset.
        for (int64_t d = k - 1; d >= 0; --d) {
          if (++idx[d] < unit_shape[d]) {
            offset += st[d];
            break;
          }
          offset -= st[d] * (unit_shape[d] - 1);
          idx[d] = 0;
        }
      }
    }
    return out;
  }
};

}  // namespace pyro_sbp
