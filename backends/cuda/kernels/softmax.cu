// Softmax over channels of (N, C, HW) float32 tensors (HW = H·W, or 1 for (N, C) features).
//
// Defines:
//   C, HW   channels, elements per channel and batch item
//   BWD     0: forward entry, 1: backward entry
//
// Element (n, c, s) is at (n·C + c)·HW + s. HW == 1: one warp per row n (rows contiguous,
// lanes stride over c; blocks of 256 threads, 8 rows a block). HW > 1: one thread per (n, s),
// looping over c at stride HW (neighbouring threads read neighbouring s: coalesced).
//
// Entries:
//   softmax_fwd(x, y, N)       y = e^(x − max) / Σ e^(x − max)
//   softmax_bwd(y, dy, dx, N)  dx = y·(dy − Σ_c dy·y)

#define CNNC_NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

#if HW == 1
// rows handled by warp `w` of the whole grid: w, w + warps, ...; the same for all its lanes
#define CNNC_ROWS(row, N)                                                                   \
    const int lane = threadIdx.x & 31;                                                      \
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;                       \
    for (long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < (N); row += warps)
#endif

#if !BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(softmax_fwd)(const float* __restrict__ x, float* __restrict__ y,
                                                                    int N) {
#if HW == 1
    CNNC_ROWS(row, N) {
        const float* xr = x + row * C;
        float* yr = y + row * C;
        float m = CNNC_NEG_INF;
        for (int c = lane; c < C; c += 32) m = fmaxf(m, xr[c]);
        m = warp_max(m);
        float s = 0.0f;
        for (int c = lane; c < C; c += 32) {
            const float e = __expf(xr[c] - m);
            yr[c] = e;
            s += e;
        }
        s = warp_sum(s);
        for (int c = lane; c < C; c += 32) yr[c] = yr[c] / s;  // the lane wrote these itself
    }
#else
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < (long long)N * HW; p += (long long)gridDim.x * blockDim.x) {
        const long long n = p / HW;
        const long long base = n * C * HW + (p - n * HW);
        float m = CNNC_NEG_INF;
        for (int c = 0; c < C; ++c) m = fmaxf(m, x[base + (long long)c * HW]);
        float s = 0.0f;
        for (int c = 0; c < C; ++c) {
            const float e = __expf(x[base + (long long)c * HW] - m);
            y[base + (long long)c * HW] = e;
            s += e;
        }
        for (int c = 0; c < C; ++c) y[base + (long long)c * HW] = y[base + (long long)c * HW] / s;
    }
#endif
}
#endif

#if BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(softmax_bwd)(const float* __restrict__ y,
                                                                    const float* __restrict__ dy,
                                                                    float* __restrict__ dx, int N) {
#if HW == 1
    CNNC_ROWS(row, N) {
        const float* yr = y + row * C;
        const float* gr = dy + row * C;
        float* dr = dx + row * C;
        float s = 0.0f;
        for (int c = lane; c < C; c += 32) s += gr[c] * yr[c];
        s = warp_sum(s);
        for (int c = lane; c < C; c += 32) dr[c] = yr[c] * (gr[c] - s);
    }
#else
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < (long long)N * HW; p += (long long)gridDim.x * blockDim.x) {
        const long long n = p / HW;
        const long long base = n * C * HW + (p - n * HW);
        float s = 0.0f;
        for (int c = 0; c < C; ++c) s += dy[base + (long long)c * HW] * y[base + (long long)c * HW];
        for (int c = 0; c < C; ++c) {
            const long long i = base + (long long)c * HW;
            dx[i] = y[i] * (dy[i] - s);
        }
    }
#endif
}
#endif

#undef CNNC_NEG_INF
#ifdef CNNC_ROWS
#undef CNNC_ROWS
#endif
