// conv_bias.cu: the epilogue's gradients for conv and fused_conv backward, in one pass over dy.
//
//   dz[img][k][pq] = dy * act'(y)          (written when ACT != 0; y is the fused output)
//   partial[split][k] = sum of dz over the split's images and all pixels  (when HAS_BIAS)
//
// act' from the output y: relu y > 0; relu6 0 < y < 6; leaky_relu (SLOPE >= 0; conv.py handles
// a negative slope with a saved mask) y > 0 ? 1 : SLOPE; sigmoid y(1 - y); tanh 1 - y^2.
// Block (k, split): images [split*imgs_per_split, min(N, (split+1)*imgs_per_split)), a strided
// loop over their pixels, then a shared-memory tree reduction (no atomics: deterministic).
// With one split `partial` is dbias itself; otherwise conv_reduce.cu's reduce_splits adds the
// partials in order.
//
// Macros: K PQ ACT SLOPE HAS_BIAS. Launch: grid (K, splits), block (BIAS_THREADS = 256);
// arguments (dy, y, dz, partial, N, imgs_per_split); y, dz, partial may be any array when unused.

constexpr int BIAS_THREADS = 256;

__device__ __forceinline__ float act_grad(float yv, float g) {
    if constexpr (ACT == 1) {
        return yv > 0.f ? g : 0.f;
    } else if constexpr (ACT == 2) {
        return (yv > 0.f && yv < 6.f) ? g : 0.f;
    } else if constexpr (ACT == 3) {
        return yv > 0.f ? g : g * (SLOPE);
    } else if constexpr (ACT == 4) {
        return g * yv * (1.f - yv);
    } else if constexpr (ACT == 5) {
        return g * (1.f - yv * yv);
    } else {
        return g;
    }
}

extern "C" __global__ void __launch_bounds__(BIAS_THREADS)
KERNEL(conv_bias_grad)(const float* __restrict__ dy, const float* __restrict__ y, float* __restrict__ dz,
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
            gv = act_grad(__ldg(y + idx), gv);
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
