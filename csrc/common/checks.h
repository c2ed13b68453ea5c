#pragma once
#include <ATen/ATen.h>

namespace ccsmerge {

// The dtype the engine computes in: float32, or float64 for float64 inputs.
inline at::ScalarType compute_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// mean's output dtype: the compute dtype unless another floating type is requested.
inline at::ScalarType mean_out_dtype(at::ScalarType input, std::optional<at::ScalarType> requested) {
  if (!requested.has_value()) return compute_dtype(input);
  const auto dtype = *requested;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "mean: output dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  return dtype;
}

// All xs share one shape, one floating dtype and one device.
inline void check_same_stack(at::TensorList xs, const char* op) {
  TORCH_CHECK(!xs.empty(), op, ": expected at least one tensor");
  const auto& x0 = xs[0];
  TORCH_CHECK(at::isFloatingType(x0.scalar_type()), op,
              ": expected floating tensors, got ", x0.scalar_type());
  for (size_t t = 1; t < xs.size(); ++t) {
    TORCH_CHECK(xs[t].sizes() == x0.sizes(), op, ": tensor ", t, " has shape ",
                xs[t].sizes(), ", tensor 0 has ", x0.sizes());
    TORCH_CHECK(xs[t].scalar_type() == x0.scalar_type(), op, ": tensor ", t,
                " has dtype ", xs[t].scalar_type(), ", tensor 0 has ", x0.scalar_type());
    TORCH_CHECK(xs[t].device() == x0.device(), op, ": tensor ", t, " is on ",
                xs[t].device(), ", tensor 0 on ", x0.device());
  }
}

// center (m, n) + alpha * left (m, r) @ right (r, n), written in a floating dtype.
inline void check_lowrank_update_args(const at::Tensor& center, const at::Tensor& left,
                                      const at::Tensor& right, at::ScalarType dtype) {
  TORCH_CHECK(center.dim() == 2 && left.dim() == 2 && right.dim() == 2,
              "lowrank_update: expected 2-D center, left and right");
  TORCH_CHECK(left.size(0) == center.size(0) && right.size(1) == center.size(1) &&
                  left.size(1) == right.size(0),
              "lowrank_update: shapes do not chain: center ", center.sizes(), ", left ",
              left.sizes(), ", right ", right.sizes());
  TORCH_CHECK(left.scalar_type() == center.scalar_type() &&
                  right.scalar_type() == center.scalar_type(),
              "lowrank_update: center, left and right must share one dtype");
  TORCH_CHECK(at::isFloatingType(dtype), "lowrank_update: output dtype must be floating");
}

}  // namespace ccsmerge
