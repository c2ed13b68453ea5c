#include <torch/library.h>

#include "../common/centered_matmul.h"
#include "kernels_cpu.h"

TORCH_LIBRARY_IMPL(ccsmerge, CPU, m) {
  m.impl("mean", &ccsmerge::cpu::mean);
  m.impl("centered_matmul", &ccsmerge::centered_matmul);
  m.impl("orthonormalize", &ccsmerge::cpu::orthonormalize);
  m.impl("lowrank_update", &ccsmerge::cpu::lowrank_update);
}
