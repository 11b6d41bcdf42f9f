// Batch normalisation per channel over (N, C, HW) float32 tensors (HW = H·W, or 1 for (N, C)).
//
// Defines:
//   C, HW         channels and elements per channel and batch item
//   AFFINE        1: y = x̂·weight + bias (weight and bias per channel); 0: y = x̂
//   EPS           added to the variance
//   MOMENTUM      running-statistics momentum m; ONE_MINUS_M = 1 − m
//   BWD           0: forward entries, 1: backward entries
//
// Channel c of batch item n is x[(n·C + c)·HW + s], s < HW; a channel's M = N·HW elements are
// reduced by one block of 256 threads (blockIdx.x = c): each thread sums a strided share, then a
// warp-shuffle and shared-memory reduction whose result every thread reads in the same order.
//
// Entries:
//   bn_train_fwd(x, w, b, y, rm, rv, mean, invstd, N, unbias_m)   grid C, block 256
//       mean and biased variance (two passes: Σx, then Σ(x − mean)²), y, the saved mean and
//       1/√(var + eps), and the running statistics in place:
//       rm = rm·(1 − m) + m·mean,  rv = rv·(1 − m) + unbias_m·var,  unbias_m = m·M/(M − 1)
//   bn_eval_stats(rm, rv, mean, invstd)          mean = rm, invstd = 1/√(rv + eps); C threads
//   bn_apply(x, mean, invstd, w, b, y, total)    y = (x − mean)·invstd·w + b, element-wise
//   bn_bwd(x, dy, mean, invstd, w, dx, dw, db, N, training)   grid C, block 256
//       db = Σ dy, dw = Σ dy·x̂ with x̂ = (x − mean)·invstd; training (through the batch
//       statistics): dx = w·invstd·(dy − db/M − x̂·dw/M); evaluation: dx = w·invstd·dy
// w and b are never read when AFFINE is 0 (any valid pointer).

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// the block's total, returned to every thread (each adds the warp totals in the same order)
__device__ __forceinline__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    __syncthreads();  // sh may still be read by a previous call
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) t += sh[i];
    return t;
}

// element k < N·HW of channel c: batch item k / HW, position k % HW
__device__ __forceinline__ long long chan_index(long long k, int c) {
    const long long n = k / HW;
    return (n * C + c) * HW + (k - n * HW);
}

#if !BWD
extern "C" __global__ void __launch_bounds__(kThreads) KERNEL(bn_train_fwd)(
        const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b, float* __restrict__ y,
        float* __restrict__ rm, float* __restrict__ rv, float* __restrict__ save_mean,
        float* __restrict__ save_invstd, int N, float unbias_m) {
    __shared__ float sh[kWarps];
    const int c = blockIdx.x;
    const long long M = (long long)N * HW;
    float s = 0.0f;
    for (long long k = threadIdx.x; k < M; k += kThreads) s += x[chan_index(k, c)];
    const float mean = block_sum(s, sh) / (float)M;
    float q = 0.0f;
    for (long long k = threadIdx.x; k < M; k += kThreads) {
        const float d = x[chan_index(k, c)] - mean;
        q += d * d;
    }
    const float var = block_sum(q, sh) / (float)M;  // biased: normalises the batch
    const float invstd = 1.0f / sqrtf(var + EPS);
    if (threadIdx.x == 0) {
        save_mean[c] = mean;
        save_invstd[c] = invstd;
        rm[c] = rm[c] * ONE_MINUS_M + MOMENTUM * mean;
        rv[c] = rv[c] * ONE_MINUS_M + unbias_m * var;  // unbiased, as PyTorch stores it
    }
#if AFFINE
    const float wc = w[c], bc = b[c];
#endif
    for (long long k = threadIdx.x; k < M; k += kThreads) {
        const long long i = chan_index(k, c);
        float v = (x[i] - mean) * invstd;
#if AFFINE
        v = v * wc + bc;
#endif
        y[i] = v;
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(bn_eval_stats)(const float* __restrict__ rm,
                                                                      const float* __restrict__ rv,
                                                                      float* __restrict__ mean,
                                                                      float* __restrict__ invstd) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x) {
        mean[c] = rm[c];
        invstd[c] = 1.0f / sqrtf(rv[c] + EPS);
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(bn_apply)(const float* __restrict__ x,
                                                                 const float* __restrict__ mean,
                                                                 const float* __restrict__ invstd,
                                                                 const float* __restrict__ w,
                                                                 const float* __restrict__ b, float* __restrict__ y,
                                                                 long long total) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const int c = (int)((i / HW) % C);
        float v = (x[i] - mean[c]) * invstd[c];
#if AFFINE
        v = v * w[c] + b[c];
#endif
        y[i] = v;
    }
}
#endif

#if BWD
extern "C" __global__ void __launch_bounds__(kThreads) KERNEL(bn_bwd)(
        const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ save_mean,
        const float* __restrict__ save_invstd, const float* __restrict__ w, float* __restrict__ dx,
        float* __restrict__ dw, float* __restrict__ db, int N, int training) {
    __shared__ float sh[kWarps];
    const int c = blockIdx.x;
    const long long M = (long long)N * HW;
    const float mean = save_mean[c], invstd = save_invstd[c];
    float sg = 0.0f, sgx = 0.0f;
    for (long long k = threadIdx.x; k < M; k += kThreads) {
        const long long i = chan_index(k, c);
        const float g = dy[i];
        sg += g;
        sgx += g * ((x[i] - mean) * invstd);
    }
    sg = block_sum(sg, sh);
    sgx = block_sum(sgx, sh);
#if AFFINE
    const float scale = invstd * w[c];
    if (threadIdx.x == 0) {
        dw[c] = sgx;
        db[c] = sg;
    }
#else
    const float scale = invstd;
#endif
    const float inv_m = 1.0f / (float)M;
    const float mg = sg * inv_m, mgx = sgx * inv_m;
    for (long long k = threadIdx.x; k < M; k += kThreads) {
        const long long i = chan_index(k, c);
        const float g = dy[i];
        if (training) {
            const float xh = (x[i] - mean) * invstd;
            dx[i] = (g - mg - xh * mgx) * scale;
        } else {
            dx[i] = g * scale;
        }
    }
}
#endif
