// round.cu: float32 values rounded to a narrower precision and kept as float32, for the matmuls of
// a reduced-precision plan that do not run on the tensor cores (dense layers through cuBLAS,
// depthwise convolutions): they then compute in float32 on values the format holds, as the
// tensor-core kernels do with the operands they round in registers (tensor_tile.cuh).
//
// PREC 1 tf32, 2 bf16, 3 fp16: round to nearest, ties to even; fp16 overflows to inf from 65520
// on and keeps its subnormals; NaN stays NaN (backends/numpy/precision.py rounds the same way).
// Macros: PREC. Launch: a grid-stride loop over n elements, any grid, any block.

#include "cnnc/tensor_tile.cuh"

extern "C" __global__ void KERNEL(round_to)(const float* __restrict__ x, float* __restrict__ y, long long n) {
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += step)
        y[i] = cnnc_round<PREC>(x[i]);
}
