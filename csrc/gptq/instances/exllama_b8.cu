// One bit width of the exllama family per translation unit (compile in parallel).
#include "../gemm_exllama.cuh"

namespace o4g {
template cudaError_t launch_exllama<8>(const GemmParams &, int, cudaStream_t);
}
