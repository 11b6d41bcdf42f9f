// Channel and normalisation ops of modern blocks: mul (with a C×1×1 gate; fused_mul applies the
// gate's activation too), prelu, layer_scale, channel_shuffle, pad_channels, channel_slice,
// layernorm, groupnorm, stochastic_depth.
// float32, NCHW (flat features are C channels of HW = 1); the batch is a runtime argument.
// OP selects the op (one spec compiles only that op's entries); grid-stride 1-D loops unless said.
//
// Defines:
//   OP          1 mul, 2 prelu, 3 layer_scale, 4 channel_shuffle, 5 pad_channels, 6 channel_slice,
//               7 layernorm, 8 groupnorm, 9 stochastic_depth
//   C, HW       input channels and elements per channel (H·W, or 1)
//   mul:        GATE 0 equal shapes, 1 the first input is the C×1×1 gate, 2 the second is;
//               ACT, ARG0, ARG1: the gate's activation (fused_mul: y = x·act(g)), an op code of the
//               generated header (elementwise.py) and its arguments; ACT 0 is the plain product
//   prelu:      SHARED 1: one slope (w[0]) for every channel
//   pad:        CO output channels, H, W, OH, OW, S (stride), BEFORE (zero channels before)
//   slice:      CO = hi − lo, LO
//   norms:      EPS, AFFINE; groupnorm G groups
//   sd:         PER elements per sample
//
// Entries:
//   chan_reduce(a, b, out, N, mode)      grid C, block 256: out[c] = Σ over n, s of a (mode 0),
//                                        a·b (mode 1) or a·b where b ≤ 0 (mode 2)
//   mul_fwd(a, b, y, n)                  y = a·b (the gate read at i / HW, act(gate) with ACT)
//   mul_bwd_full(dy, other, dx, n)       dx = dy·other (the gate read at i / HW when GATE ≠ 0, as act(gate))
//   mul_bwd_gate(dy, full, g, dg, rows)  dg[r] = Σ_s dy[r·HW + s]·full[r·HW + s], a warp per row, times
//                                        act'(g[r], act(g[r])) with ACT (g is not read when ACT is 0)
//   prelu_fwd(x, w, y, n)  prelu_bwd(x, dy, w, dx, n)
//   ls_fwd(x, g, y, n)                   y = x·g[c]; backward is the same entry with dy
//   shuffle(src, dst, n, g)              channel i·k + j → j·g + i (k = C/g); g = C/G inverts it
//   pad_fwd(x, y, n)  pad_bwd(dy, dx, n) (n: output, resp. input elements)
//   slice_fwd(x, y, n)  slice_bwd(dy, dx, n)
//   ln_fwd(x, w, b, y, xhat, inv, positions)   a thread per (n, s): mean, biased variance over C
//   ln_bwd(xhat, inv, dy, w, dx, positions)    dx = inv·(g − mean_c g − x̂·mean_c(g·x̂)), g = dy·w
//   gn_fwd(x, w, b, y, xhat, inv)        grid N·G, block 256: a block per sample and group
//   gn_bwd(xhat, inv, dy, w, dx)         grid N·G, block 256
//   sd_apply(in, mask, out, n)           out = in·mask[i / PER]
// w and b are never read when AFFINE is 0 (any valid pointer).

#include "cnnc/elementwise.cuh"

constexpr int kThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// the block's total, returned to every thread
__device__ __forceinline__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < kThreads / 32; ++i) t += sh[i];
    return t;
}

#define GRID_LOOP(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void __launch_bounds__(256) KERNEL(chan_reduce)(const float* __restrict__ a,
                                                                    const float* __restrict__ b,
                                                                    float* __restrict__ out, int N, int mode) {
    __shared__ float sh[kThreads / 32];
    const int c = blockIdx.x;
    float acc = 0.0f;
    for (long long t = threadIdx.x; t < (long long)N * HW; t += blockDim.x) {
        const long long n = t / HW, s = t % HW;
        const long long i = (n * C + c) * HW + s;
        const float v = a[i];
        if (mode == 0) acc += v;
        else if (mode == 1) acc += v * b[i];
        else acc += b[i] <= 0.0f ? v * b[i] : 0.0f;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) out[c] = acc;
}

#if OP == 1
// the gate operand's value as the product uses it: act(g) (g itself when ACT is 0)
__device__ __forceinline__ float gate_value(float g) { return cnnc_act_fwd(ACT, g, ARG0, ARG1); }

extern "C" __global__ void __launch_bounds__(256) KERNEL(mul_fwd)(const float* __restrict__ a,
                                                                const float* __restrict__ b,
                                                                float* __restrict__ y, long long n) {
    GRID_LOOP(i, n) {
#if GATE == 1
        y[i] = gate_value(a[i / HW]) * b[i];
#elif GATE == 2
        y[i] = a[i] * gate_value(b[i / HW]);
#else
        y[i] = a[i] * b[i];
#endif
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(mul_bwd_full)(const float* __restrict__ dy,
                                                                     const float* __restrict__ other,
                                                                     float* __restrict__ dx, long long n) {
    GRID_LOOP(i, n) {
#if GATE == 0
        dx[i] = dy[i] * other[i];
#else
        dx[i] = dy[i] * gate_value(other[i / HW]);
#endif
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(mul_bwd_gate)(const float* __restrict__ dy,
                                                                     const float* __restrict__ full,
                                                                     const float* __restrict__ g,
                                                                     float* __restrict__ dg, long long rows) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (long long r = warp; r < rows; r += warps) {
        float acc = 0.0f;
        for (int s = lane; s < HW; s += 32) acc += dy[r * HW + s] * full[r * HW + s];
        acc = warp_sum(acc);
        if (lane == 0) {
            if constexpr (ACT != 0) {
                const float gv = g[r];
                acc = acc * cnnc_act_grad(ACT, gv, cnnc_act_fwd(ACT, gv, ARG0, ARG1), ARG0, ARG1);
            }
            dg[r] = acc;
        }
    }
}
#endif

#if OP == 2
__device__ __forceinline__ float slope(const float* w, long long i) {
#if SHARED
    return w[0];
#else
    return w[(i / HW) % C];
#endif
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(prelu_fwd)(const float* __restrict__ x,
                                                                  const float* __restrict__ w,
                                                                  float* __restrict__ y, long long n) {
    GRID_LOOP(i, n) {
        const float v = x[i];
        y[i] = v > 0.0f ? v : v * slope(w, i);
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(prelu_bwd)(const float* __restrict__ x,
                                                                  const float* __restrict__ dy,
                                                                  const float* __restrict__ w,
                                                                  float* __restrict__ dx, long long n) {
    GRID_LOOP(i, n) dx[i] = x[i] > 0.0f ? dy[i] : dy[i] * slope(w, i);
}
#endif

#if OP == 3
extern "C" __global__ void __launch_bounds__(256) KERNEL(ls_fwd)(const float* __restrict__ x,
                                                               const float* __restrict__ g,
                                                               float* __restrict__ y, long long n) {
    GRID_LOOP(i, n) y[i] = x[i] * g[(i / HW) % C];
}
#endif

#if OP == 4
extern "C" __global__ void __launch_bounds__(256) KERNEL(shuffle)(const float* __restrict__ src,
                                                                float* __restrict__ dst, long long n, int g) {
    const int k = C / g;
    GRID_LOOP(i, n) {
        const long long s = i % HW, oc = (i / HW) % C, b = i / ((long long)C * HW);
        const long long ic = (oc % g) * k + oc / g;  // output channel j·g + i' holds input channel i'·k + j
        dst[i] = src[(b * C + ic) * HW + s];
    }
}
#endif

#if OP == 5
extern "C" __global__ void __launch_bounds__(256) KERNEL(pad_fwd)(const float* __restrict__ x,
                                                                float* __restrict__ y, long long n) {
    GRID_LOOP(i, n) {
        const long long ow = i % OW, oh = (i / OW) % OH, co = (i / ((long long)OW * OH)) % CO;
        const long long b = i / ((long long)OW * OH * CO);
        const long long ci = co - BEFORE;
        y[i] = (ci >= 0 && ci < C) ? x[((b * C + ci) * H + oh * S) * W + ow * S] : 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(pad_bwd)(const float* __restrict__ dy,
                                                                float* __restrict__ dx, long long n) {
    GRID_LOOP(i, n) {
        const long long w = i % W, h = (i / W) % H, ci = (i / ((long long)W * H)) % C;
        const long long b = i / ((long long)W * H * C);
        dx[i] = (h % S == 0 && w % S == 0) ? dy[((b * CO + ci + BEFORE) * OH + h / S) * OW + w / S] : 0.0f;
    }
}
#endif

#if OP == 6
extern "C" __global__ void __launch_bounds__(256) KERNEL(slice_fwd)(const float* __restrict__ x,
                                                                  float* __restrict__ y, long long n) {
    GRID_LOOP(i, n) {
        const long long s = i % HW, co = (i / HW) % CO, b = i / ((long long)CO * HW);
        y[i] = x[(b * C + LO + co) * HW + s];
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(slice_bwd)(const float* __restrict__ dy,
                                                                  float* __restrict__ dx, long long n) {
    GRID_LOOP(i, n) {
        const long long s = i % HW, ci = (i / HW) % C, b = i / ((long long)C * HW);
        dx[i] = (ci >= LO && ci < LO + CO) ? dy[(b * CO + ci - LO) * HW + s] : 0.0f;
    }
}
#endif

#if OP == 7
extern "C" __global__ void __launch_bounds__(256) KERNEL(ln_fwd)(const float* __restrict__ x,
                                                               const float* __restrict__ w,
                                                               const float* __restrict__ b,
                                                               float* __restrict__ y, float* __restrict__ xhat,
                                                               float* __restrict__ inv, long long positions) {
    GRID_LOOP(p, positions) {
        const long long base = (p / HW) * C * HW + p % HW;
        float mean = 0.0f;
        for (int c = 0; c < C; ++c) mean += x[base + (long long)c * HW];
        mean /= C;
        float var = 0.0f;
        for (int c = 0; c < C; ++c) {
            const float d = x[base + (long long)c * HW] - mean;
            var += d * d;
        }
        const float r = rsqrtf(var / C + EPS);
        inv[p] = r;
        for (int c = 0; c < C; ++c) {
            const long long i = base + (long long)c * HW;
            const float h = (x[i] - mean) * r;
            xhat[i] = h;
            y[i] = AFFINE ? h * w[c] + b[c] : h;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(ln_bwd)(const float* __restrict__ xhat,
                                                               const float* __restrict__ inv,
                                                               const float* __restrict__ dy,
                                                               const float* __restrict__ w,
                                                               float* __restrict__ dx, long long positions) {
    GRID_LOOP(p, positions) {
        const long long base = (p / HW) * C * HW + p % HW;
        float mg = 0.0f, mgx = 0.0f;
        for (int c = 0; c < C; ++c) {
            const long long i = base + (long long)c * HW;
            const float g = AFFINE ? dy[i] * w[c] : dy[i];
            mg += g;
            mgx += g * xhat[i];
        }
        mg /= C;
        mgx /= C;
        for (int c = 0; c < C; ++c) {
            const long long i = base + (long long)c * HW;
            const float g = AFFINE ? dy[i] * w[c] : dy[i];
            dx[i] = inv[p] * (g - mg - xhat[i] * mgx);
        }
    }
}
#endif

#if OP == 8
constexpr long long kGroupSize = (long long)(C / G) * HW;  // elements of one sample's group

extern "C" __global__ void __launch_bounds__(256) KERNEL(gn_fwd)(const float* __restrict__ x,
                                                               const float* __restrict__ w,
                                                               const float* __restrict__ b,
                                                               float* __restrict__ y, float* __restrict__ xhat,
                                                               float* __restrict__ inv) {
    __shared__ float sh[kThreads / 32];
    const long long base = (long long)blockIdx.x * kGroupSize;  // sample n, group g: blockIdx.x = n·G + g
    const int g = blockIdx.x % G;
    float s = 0.0f;
    for (long long t = threadIdx.x; t < kGroupSize; t += blockDim.x) s += x[base + t];
    const float mean = block_sum(s, sh) / kGroupSize;
    float v = 0.0f;
    for (long long t = threadIdx.x; t < kGroupSize; t += blockDim.x) {
        const float d = x[base + t] - mean;
        v += d * d;
    }
    const float r = rsqrtf(block_sum(v, sh) / kGroupSize + EPS);
    if (threadIdx.x == 0) inv[blockIdx.x] = r;
    for (long long t = threadIdx.x; t < kGroupSize; t += blockDim.x) {
        const int c = g * (C / G) + (int)(t / HW);
        const float h = (x[base + t] - mean) * r;
        xhat[base + t] = h;
        y[base + t] = AFFINE ? h * w[c] + b[c] : h;
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(gn_bwd)(const float* __restrict__ xhat,
                                                               const float* __restrict__ inv,
                                                               const float* __restrict__ dy,
                                                               const float* __restrict__ w,
                                                               float* __restrict__ dx) {
    __shared__ float sh[kThreads / 32];
    const long long base = (long long)blockIdx.x * kGroupSize;
    const int g = blockIdx.x % G;
    float sg = 0.0f, sgx = 0.0f;
    for (long long t = threadIdx.x; t < kGroupSize; t += blockDim.x) {
        const int c = g * (C / G) + (int)(t / HW);
        const float gv = AFFINE ? dy[base + t] * w[c] : dy[base + t];
        sg += gv;
        sgx += gv * xhat[base + t];
    }
    const float mg = block_sum(sg, sh) / kGroupSize;
    const float mgx = block_sum(sgx, sh) / kGroupSize;
    const float r = inv[blockIdx.x];
    for (long long t = threadIdx.x; t < kGroupSize; t += blockDim.x) {
        const int c = g * (C / G) + (int)(t / HW);
        const float gv = AFFINE ? dy[base + t] * w[c] : dy[base + t];
        dx[base + t] = r * (gv - mg - xhat[base + t] * mgx);
    }
}
#endif

#if OP == 9
extern "C" __global__ void __launch_bounds__(256) KERNEL(sd_apply)(const float* __restrict__ in,
                                                                 const float* __restrict__ mask,
                                                                 float* __restrict__ out, long long n) {
    GRID_LOOP(i, n) out[i] = in[i] * mask[i / PER];
}
#endif

#undef GRID_LOOP
