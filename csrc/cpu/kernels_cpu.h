#pragma once
#include <ATen/ATen.h>

namespace ccsmerge::cpu {

at::Tensor mean(at::TensorList xs, std::optional<at::ScalarType> dtype);
at::Tensor orthonormalize(const at::Tensor& y);
at::Tensor lowrank_update(const at::Tensor& center, const at::Tensor& left,
                          const at::Tensor& right, double alpha, at::ScalarType dtype);

}  // namespace ccsmerge::cpu
