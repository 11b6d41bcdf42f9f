// Pooling over NCHW float32 tensors, forward and backward, PyTorch's semantics.
//
// Defines:
//   POOL        1 maxpool, 2 avgpool, 3 globalavgpool, 4 adaptive_avgpool
//   C, H, W     input channels and size;  OH, OW  output size
//   KH, KW, SH, SW, PT, PB, PL, PR   window, stride and pads (top, bottom, left, right): POOL 1, 2
//   COUNT_PAD   avgpool: padded zeros count in the divisor (count_include_pad)
//   BWD         0: forward entries, 1: backward entries
//
// Output (oh, ow) of a max/avg pool reads input rows oh·SH − PT + i, i < KH (columns alike);
// rows outside [0, H) are padding or the ceil-mode overhang and contribute nothing (max: −inf,
// avg: 0). Backward gathers: one thread per input element sums the gradients of the outputs
// whose windows hold it, so no atomics and a deterministic order. Element indices are flat
// NCHW: ((n·C + c)·H + h)·W + w; `nc` below is n·C + c, the plane number.
//
// Entries (grid-stride loops over a 1-D launch):
//   POOL 1: maxpool_fwd(x, y, argmax, total, save)  total = N·C·OH·OW; argmax (int32, the
//                                                   winner's h·W + w in its plane) if save
//           maxpool_bwd(argmax, dy, dx, total)      total = N·C·H·W
//   POOL 2: avgpool_fwd(x, y, total) / avgpool_bwd(dy, dx, total)
//   POOL 3: gap_fwd(x, y, planes)  one warp per plane, planes = N·C / gap_bwd(dy, dx, total)
//   POOL 4: adaptive_fwd(x, y, total) / adaptive_bwd(dy, dx, total)
//           windows [floor(o·H/OH), ceil((o+1)·H/OH)) per axis

#define CNNC_LOOP(i, total) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (total); i += (long long)gridDim.x * blockDim.x)

#if POOL == 1 || POOL == 2
// outputs o (along one axis) whose window [o·S − P, o·S − P + K) holds input index i: [lo, hi]
__device__ __forceinline__ void out_range(int i, int P, int K, int S, int O, int& lo, int& hi) {
    int a = i + P - K + 1;
    lo = a > 0 ? (a + S - 1) / S : 0;
    hi = (i + P) / S;  // i + P >= 0
    if (hi > O - 1) hi = O - 1;
}
#endif

#if POOL == 2
// PyTorch's divisor: the window clipped to input + padding (never the ceil overhang), or with
// count_pad off, clipped to the input
__device__ __forceinline__ int avg_count(int oh, int ow) {
    int hs = oh * SH - PT, ws = ow * SW - PL;
    int he = min(hs + KH, H + PB), we = min(ws + KW, W + PR);
#if !COUNT_PAD
    hs = max(hs, 0);
    ws = max(ws, 0);
    he = min(he, H);
    we = min(we, W);
#endif
    return (he - hs) * (we - ws);
}
#endif

#if POOL == 4
__device__ __forceinline__ int win_start(int o, int n, int out) { return (o * n) / out; }
__device__ __forceinline__ int win_end(int o, int n, int out) { return ((o + 1) * n + out - 1) / out; }
#endif

#if POOL == 1 && !BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(maxpool_fwd)(const float* __restrict__ x, float* __restrict__ y,
                                                                    int* __restrict__ argmax, long long total, int save) {
    CNNC_LOOP(idx, total) {
        const int ow = (int)(idx % OW);
        const long long t = idx / OW;
        const int oh = (int)(t % OH);
        const long long nc = t / OH;
        const float* xp = x + nc * (H * W);
        const int h0 = oh * SH - PT, w0 = ow * SW - PL;
        float best = 0.0f;
        int arg = -1;
#pragma unroll
        for (int i = 0; i < KH; ++i) {
            const int ih = h0 + i;
            if (ih < 0 || ih >= H) continue;
#pragma unroll
            for (int j = 0; j < KW; ++j) {
                const int iw = w0 + j;
                if (iw < 0 || iw >= W) continue;
                const float v = xp[ih * W + iw];
                // strictly greater: ties go to the first maximum in row-major order (PyTorch); NaN wins
                if (arg < 0 || v > best || v != v) {
                    best = v;
                    arg = ih * W + iw;
                }
            }
        }
        y[idx] = best;  // every window holds an input element (the shape rule guarantees it)
        if (save) argmax[idx] = arg;
    }
}
#endif

#if POOL == 1 && BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(maxpool_bwd)(const int* __restrict__ argmax,
                                                                    const float* __restrict__ dy,
                                                                    float* __restrict__ dx, long long total) {
    CNNC_LOOP(idx, total) {
        const int iw = (int)(idx % W);
        const long long t = idx / W;
        const int ih = (int)(t % H);
        const long long nc = t / H;
        int hlo, hhi, wlo, whi;
        out_range(ih, PT, KH, SH, OH, hlo, hhi);
        out_range(iw, PL, KW, SW, OW, wlo, whi);
        const int me = ih * W + iw;
        const long long base = nc * (OH * OW);
        float s = 0.0f;
        for (int oh = hlo; oh <= hhi; ++oh)
            for (int ow = wlo; ow <= whi; ++ow) {
                const long long o = base + oh * OW + ow;
                if (argmax[o] == me) s += dy[o];
            }
        dx[idx] = s;
    }
}
#endif

#if POOL == 2 && !BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(avgpool_fwd)(const float* __restrict__ x, float* __restrict__ y,
                                                                    long long total) {
    CNNC_LOOP(idx, total) {
        const int ow = (int)(idx % OW);
        const long long t = idx / OW;
        const int oh = (int)(t % OH);
        const long long nc = t / OH;
        const float* xp = x + nc * (H * W);
        const int h0 = oh * SH - PT, w0 = ow * SW - PL;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < KH; ++i) {
            const int ih = h0 + i;
            if (ih < 0 || ih >= H) continue;
#pragma unroll
            for (int j = 0; j < KW; ++j) {
                const int iw = w0 + j;
                if (iw < 0 || iw >= W) continue;
                s += xp[ih * W + iw];
            }
        }
        y[idx] = s / (float)avg_count(oh, ow);
    }
}
#endif

#if POOL == 2 && BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(avgpool_bwd)(const float* __restrict__ dy,
                                                                    float* __restrict__ dx, long long total) {
    CNNC_LOOP(idx, total) {
        const int iw = (int)(idx % W);
        const long long t = idx / W;
        const int ih = (int)(t % H);
        const long long nc = t / H;
        int hlo, hhi, wlo, whi;
        out_range(ih, PT, KH, SH, OH, hlo, hhi);
        out_range(iw, PL, KW, SW, OW, wlo, whi);
        const float* g = dy + nc * (OH * OW);
        float s = 0.0f;
        for (int oh = hlo; oh <= hhi; ++oh)
            for (int ow = wlo; ow <= whi; ++ow) s += g[oh * OW + ow] / (float)avg_count(oh, ow);
        dx[idx] = s;
    }
}
#endif

#if POOL == 3 && !BWD
// one warp per (n, c) plane; blockDim.x a multiple of 32, so `plane` is the same in a warp
extern "C" __global__ void __launch_bounds__(256) KERNEL(gap_fwd)(const float* __restrict__ x, float* __restrict__ y,
                                                                long long planes) {
    const int lane = threadIdx.x & 31;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long p = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; p < planes; p += warps) {
        const float* xp = x + p * (H * W);
        float s = 0.0f;
        for (int k = lane; k < H * W; k += 32) s += xp[k];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) y[p] = s / (float)(H * W);
    }
}
#endif

#if POOL == 3 && BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(gap_bwd)(const float* __restrict__ dy, float* __restrict__ dx,
                                                                long long total) {
    const float inv = 1.0f / (float)(H * W);
    CNNC_LOOP(idx, total) dx[idx] = dy[idx / (H * W)] * inv;
}
#endif

#if POOL == 4 && !BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(adaptive_fwd)(const float* __restrict__ x,
                                                                     float* __restrict__ y, long long total) {
    CNNC_LOOP(idx, total) {
        const int ow = (int)(idx % OW);
        const long long t = idx / OW;
        const int oh = (int)(t % OH);
        const long long nc = t / OH;
        const float* xp = x + nc * (H * W);
        const int hs = win_start(oh, H, OH), he = win_end(oh, H, OH);
        const int ws = win_start(ow, W, OW), we = win_end(ow, W, OW);
        float s = 0.0f;
        for (int ih = hs; ih < he; ++ih)
            for (int iw = ws; iw < we; ++iw) s += xp[ih * W + iw];
        y[idx] = s / (float)((he - hs) * (we - ws));
    }
}
#endif

#if POOL == 4 && BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(adaptive_bwd)(const float* __restrict__ dy,
                                                                     float* __restrict__ dx, long long total) {
    CNNC_LOOP(idx, total) {
        const int iw = (int)(idx % W);
        const long long t = idx / W;
        const int ih = (int)(t % H);
        const long long nc = t / H;
        // windows holding ih: o from floor(ih·OH/H) to ceil((ih+1)·OH/H) − 1 (checked again below)
        const int hlo = (ih * OH) / H, hhi = min(((ih + 1) * OH + H - 1) / H - 1, OH - 1);
        const int wlo = (iw * OW) / W, whi = min(((iw + 1) * OW + W - 1) / W - 1, OW - 1);
        const float* g = dy + nc * (OH * OW);
        float s = 0.0f;
        for (int oh = hlo; oh <= hhi; ++oh) {
            const int hs = win_start(oh, H, OH), he = win_end(oh, H, OH);
            if (ih < hs || ih >= he) continue;
            for (int ow = wlo; ow <= whi; ++ow) {
                const int ws = win_start(ow, W, OW), we = win_end(ow, W, OW);
                if (iw < ws || iw >= we) continue;
                s += g[oh * OW + ow] / (float)((he - hs) * (we - ws));
            }
        }
        dx[idx] = s;
    }
}
#endif

#undef CNNC_LOOP
