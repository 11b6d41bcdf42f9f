// conv_bias.cu: the epilogue's gradients for conv and fused_conv backward, in one pass over dy.
//
//   dz[img][k][pq] = dy * f'(z, y)         (written when ACT != 0; z the pre-activation, y the
//                                           fused output, each read only when the derivative does)
//   partial[split][k] = sum of dz over the split's images and all pixels  (when HAS_BIAS)
//
// f' is op ACT's derivative from the generated header (elementwise.py) with arguments ARG0, ARG1.
// GRAD_X: the derivative reads the activation's input, z (conv_fwd.cu / conv_dw.cu saved it with
// SAVE_PRE); GRAD_Y: it reads the output y.
// Block (k, split): images [split*imgs_per_split, min(N, (split+1)*imgs_per_split)), a strided
// loop over their pixels, then a shared-memory tree reduction (no atomics: deterministic).
// With one split `partial` is dbias itself; otherwise conv_reduce.cu's reduce_splits adds the
// partials in order.
//
// Macros: K PQ ACT ARG0 ARG1 GRAD_X GRAD_Y HAS_BIAS. Launch: grid (K, splits), block
// (BIAS_THREADS = 256); arguments (dy, y, z, dz, partial, N, imgs_per_split); y, z, dz, partial
// may be any array when unused.

#include "cnnc/elementwise.cuh"

constexpr int BIAS_THREADS = 256;

extern "C" __global__ void __launch_bounds__(BIAS_THREADS)
KERNEL(conv_bias_grad)(const float* __restrict__ dy, const float* __restrict__ y, const float* __restrict__ z,
                       float* __restrict__ dz,
                       float* __restrict__ partial, int batch, int imgs_per_split) {
    __shared__ float red[BIAS_THREADS];
    const int tid = threadIdx.x;
    const int k = blockIdx.x;
    const int split = blockIdx.y;
    const int img0 = split * imgs_per_split;
    const int img1 = img0 + imgs_per_split < batch ? img0 + imgs_per_split : batch;
    const int count = img1 > img0 ? (img1 - img0) * PQ : 0;
    float sum = 0.f;
    for (int t = tid; t < count; t += BIAS_THREADS) {
        const int img = img0 + t / PQ;
        const long long idx = ((long long)img * K + k) * PQ + (t % PQ);
        float gv = __ldg(dy + idx);
        if constexpr (ACT != 0) {
            const float zv = GRAD_X ? __ldg(z + idx) : 0.f;
            const float yv = GRAD_Y ? __ldg(y + idx) : 0.f;
            gv = gv * cnnc_act_grad(ACT, zv, yv, ARG0, ARG1);
            dz[idx] = gv;
        }
        sum += gv;
    }
    if constexpr (HAS_BIAS) {
        red[tid] = sum;
        __syncthreads();
#pragma unroll
        for (int s = BIAS_THREADS / 2; s > 0; s >>= 1) {
            if (tid < s) red[tid] += red[tid + s];
            __syncthreads();
        }
        if (tid == 0) partial[(long long)split * K + k] = red[0];
    }
}
