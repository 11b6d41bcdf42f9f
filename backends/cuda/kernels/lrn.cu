// Local response normalisation across channels, as PyTorch's LocalResponseNorm, (N, C, HW) float32.
//
// Defines:
//   C, HW              channels, elements per channel and batch item
//   SIZE, ALPHA, BETA, K   the window n and the constants:
//       d_c = K + ALPHA/SIZE · Σ_{j = c − SIZE/2 … c + (SIZE−1)/2, 0 <= j < C} x_j²,  y_c = x_c · d_c^(−BETA)
//   ALPHA_N            ALPHA / SIZE;   COEF   2·BETA·ALPHA / SIZE
//   BWD                0: forward entry, 1: backward entry
//
// One thread per element (n, c, s) at (n·C + c)·HW + s; its channel neighbours are ±HW away.
//
// Entries:
//   lrn_fwd(x, y, d, total, save)     y, and d (the denominators) when save
//   lrn_bwd(x, d, dy, dx, total)      dx_i = dy_i·d_i^−β − COEF·x_i·Σ_{j = i − (SIZE−1)/2 … i + SIZE/2} t_j,
//                                     t_j = dy_j·x_j·d_j^−β / d_j  (j ∈ window(i) ⇔ i ∈ window(j))

#define CNNC_LOOP(i, total) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (total); i += (long long)gridDim.x * blockDim.x)

#if !BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(lrn_fwd)(const float* __restrict__ x, float* __restrict__ y,
                                                                float* __restrict__ d_out, long long total, int save) {
    CNNC_LOOP(i, total) {
        const int c = (int)((i / HW) % C);
        const long long base = i - (long long)c * HW;  // channel 0 of this (n, s)
        float s = 0.0f;
#pragma unroll
        for (int o = -(SIZE / 2); o <= (SIZE - 1) / 2; ++o) {
            const int j = c + o;
            if (j >= 0 && j < C) {
                const float v = x[base + (long long)j * HW];
                s += v * v;
            }
        }
        const float d = s * ALPHA_N + K;
        y[i] = x[i] * powf(d, -BETA);
        if (save) d_out[i] = d;
    }
}
#endif

#if BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(lrn_bwd)(const float* __restrict__ x,
                                                                const float* __restrict__ d,
                                                                const float* __restrict__ dy,
                                                                float* __restrict__ dx, long long total) {
    CNNC_LOOP(i, total) {
        const int c = (int)((i / HW) % C);
        const long long base = i - (long long)c * HW;
        float s = 0.0f;
#pragma unroll
        for (int o = -((SIZE - 1) / 2); o <= SIZE / 2; ++o) {
            const int j = c + o;
            if (j >= 0 && j < C) {
                const long long k = base + (long long)j * HW;
                const float dj = d[k];
                s += dy[k] * x[k] * powf(dj, -BETA) / dj;
            }
        }
        dx[i] = dy[i] * powf(d[i], -BETA) - COEF * x[i] * s;
    }
}
#endif

#undef CNNC_LOOP
