#include <torch/library.h>

#include "../common/centered_matmul.h"
#include "kernels_cuda.h"

TORCH_LIBRARY_IMPL(ccsmerge, CUDA, m) {
  m.impl("mean", &ccsmerge::cuda::mean);
  m.impl("centered_matmul", &ccsmerge::centered_matmul);
  m.impl("orthonormalize", &ccsmerge::cuda::orthonormalize);
  m.impl("lowrank_update", &ccsmerge::cuda::lowrank_update);
}
