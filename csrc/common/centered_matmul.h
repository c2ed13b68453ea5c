#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace ccsmerge {

// Device-generic: the products go to the device's BLAS through ATen.
at::Tensor centered_matmul(at::TensorList xs, const std::optional<at::Tensor>& center,
                           const at::Tensor& rhs, bool transpose);

}  // namespace ccsmerge
