#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <vector>

#include "../common/checks.h"
#include "kernels_cuda.h"

namespace ccsmerge::cuda {

namespace {

// Inputs per launch; more are summed over several launches through the output,
// in the same order, so the result does not depend on T's size.
constexpr int kMaxInputs = 32;
constexpr int kThreads = 256;

template <typename scalar_t>
struct InputPointers {
  const scalar_t* ptr[kMaxInputs];
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One pass over the inputs: out = (partial sum so far + sum of this launch's
// inputs), divided by `count` on the last launch. Each thread owns kVec
// consecutive elements and reads them with one 16-byte load per input.
template <typename scalar_t, typename acc_t, int kVec>
__global__ void mean_kernel(InputPointers<scalar_t> in, int num_inputs, acc_t* __restrict__ out,
                            int64_t num_packs, bool accumulate, bool finalize, acc_t count) {
  using InPack = Pack<scalar_t, kVec>;
  using OutPack = Pack<acc_t, kVec>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < num_packs;
       p += stride) {
    acc_t acc[kVec];
    if (accumulate) {
      const OutPack prev = reinterpret_cast<const OutPack*>(out)[p];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = prev.v[i];
    } else {
      const InPack first = reinterpret_cast<const InPack*>(in.ptr[0])[p];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = static_cast<acc_t>(first.v[i]);
    }
#pragma unroll 4
    for (int t = accumulate ? 0 : 1; t < num_inputs; ++t) {
      const InPack x = reinterpret_cast<const InPack*>(in.ptr[t])[p];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] += static_cast<acc_t>(x.v[i]);
    }
    OutPack result;
#pragma unroll
    for (int i = 0; i < kVec; ++i) result.v[i] = finalize ? acc[i] / count : acc[i];
    reinterpret_cast<OutPack*>(out)[p] = result;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename scalar_t, typename acc_t, int kVec>
void launch_mean(const std::vector<const scalar_t*>& inputs, acc_t* out, int64_t n) {
  const int64_t num_packs = n / kVec;
  if (num_packs == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (num_packs + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::min<int64_t>(wanted, static_cast<int64_t>(sms) * 8));
  const int T = static_cast<int>(inputs.size());
  for (int first = 0; first < T; first += kMaxInputs) {
    const int num = std::min(kMaxInputs, T - first);
    InputPointers<scalar_t> ptrs{};
    for (int t = 0; t < num; ++t) ptrs.ptr[t] = inputs[first + t];
    mean_kernel<scalar_t, acc_t, kVec><<<blocks, kThreads, 0, stream>>>(
        ptrs, num, out, num_packs, /*accumulate=*/first > 0, /*finalize=*/first + num == T,
        static_cast<acc_t>(T));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

at::Tensor mean(at::TensorList xs, std::optional<at::ScalarType> out_dtype) {
  check_same_stack(xs, "mean");
  const auto& x0 = xs[0];
  TORCH_CHECK(x0.is_cuda(), "mean (cuda): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(x0.device());
  const auto dtype = compute_dtype(x0.scalar_type());
  // Another output dtype is one rounding of the accumulated mean (not fused here).
  const auto final_dtype = mean_out_dtype(x0.scalar_type(), out_dtype);
  auto out = at::empty(x0.sizes(), x0.options().dtype(dtype));
  const int64_t n = out.numel();
  if (n == 0) return out.to(final_dtype);
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(xs.size());
  for (const auto& x : xs) contiguous.push_back(x.contiguous());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), "ccsmerge_mean_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    std::vector<const scalar_t*> ptrs;
    bool vectorizable = aligned16(out.const_data_ptr());
    for (const auto& x : contiguous) {
      ptrs.push_back(x.const_data_ptr<scalar_t>());
      vectorizable = vectorizable && aligned16(ptrs.back());
    }
    acc_t* o = out.mutable_data_ptr<acc_t>();
    int64_t done = 0;
    if (vectorizable) {
      launch_mean<scalar_t, acc_t, kVec>(ptrs, o, n);
      done = n / kVec * kVec;
    }
    if (done < n) {  // the unaligned case, or the tail after the packs
      for (auto& p : ptrs) p += done;
      launch_mean<scalar_t, acc_t, 1>(ptrs, o + done, n - done);
    }
  });
  return out.to(final_dtype);
}

}  // namespace ccsmerge::cuda
