// Element-wise ops of the op table and chains of them, and the dense layer's epilogue (bias +
// activation). float32; element-wise entries see the tensor as a flat array of n elements (any layout).
// The ops themselves are the generated header's (elementwise.py): cnnc_act_fwd / cnnc_act_grad by op code.
//
// Defines:
//   CHAIN_LEN          ops applied in order, 0..MAX_CHAIN (a single op is a chain of one)
//   CHAIN_CODES        their op codes, comma-separated ("0" when CHAIN_LEN is 0)
//   CHAIN_ARG0/ARG1    their first and second formula arguments, comma-separated float literals
//   COLS               0: plain element-wise entries; > 0: the dense epilogue over (rows, COLS)
//   BIAS               dense epilogue: add bias[col] before the chain
//   VEC                1 when n is a multiple of 4 for every batch size: float4 path (taken when
//                      the pointers are 16-byte aligned too, else the scalar loop runs)
//   BWD                0: forward entries, 1: backward entries
//
// Entries (grid-stride loops, any 1-D launch):
//   COLS == 0, BWD == 0: act_fwd(x, y, n)                 y = chain(x)
//   COLS  > 0, BWD == 0: dense_fwd(z, y, bias, n)          v = z + bias[i % COLS]; z = v; y = chain(v)
//                                                          (y may be z: then y = chain(v) in place)
//   BWD == 1:            act_bwd_out(y, dy, dx, n)        single op whose derivative reads only its
//                                                          output (or nothing): dx = dy·f'(·, y)
//                        act_bwd_in(x, dy, dx, n)         any chain, recomputed from its input x,
//                                                          the local derivatives multiplied op after op
//   COLS  > 0, BWD == 1: bias_grad(dz, db, rows)          db[j] = sum_r dz[r, j], one thread a column

#include "cnnc/elementwise.cuh"

constexpr int CHAIN_N = CHAIN_LEN > 0 ? CHAIN_LEN : 1;
__device__ constexpr int kChainCodes[CHAIN_N] = {CHAIN_CODES};
__device__ constexpr float kChainArg0[CHAIN_N] = {CHAIN_ARG0};
__device__ constexpr float kChainArg1[CHAIN_N] = {CHAIN_ARG1};

__device__ __forceinline__ float chain_fwd(float v) {
#pragma unroll
    for (int i = 0; i < CHAIN_LEN; ++i) v = cnnc_act_fwd(kChainCodes[i], v, kChainArg0[i], kChainArg1[i]);
    return v;
}

// d chain / d x · g, recomputing the chain from its input z, op after op (each Jacobian is
// diagonal, so the product can be taken in forward order)
__device__ __forceinline__ float chain_bwd_in(float z, float g) {
#pragma unroll
    for (int i = 0; i < CHAIN_LEN; ++i) {
        const float y = cnnc_act_fwd(kChainCodes[i], z, kChainArg0[i], kChainArg1[i]);
        g = g * cnnc_act_grad(kChainCodes[i], z, y, kChainArg0[i], kChainArg1[i]);
        z = y;
    }
    return g;
}

// a single op from its output (its derivative does not read the input)
__device__ __forceinline__ float chain_bwd_out(float y, float g) {
    return CHAIN_LEN >= 1 ? g * cnnc_act_grad(kChainCodes[0], 0.0f, y, kChainArg0[0], kChainArg1[0]) : g;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (((unsigned long long)p) & 15ull) == 0; }

#define CNNC_TID ((long long)blockIdx.x * blockDim.x + threadIdx.x)
#define CNNC_STRIDE ((long long)gridDim.x * blockDim.x)

#if COLS == 0 && !BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(act_fwd)(const float* __restrict__ x, float* __restrict__ y,
                                                                long long n) {
#if VEC
    if (aligned16(x) && aligned16(y)) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        float4* y4 = reinterpret_cast<float4*>(y);
        for (long long i = CNNC_TID; i < n / 4; i += CNNC_STRIDE) {
            float4 v = x4[i];
            v.x = chain_fwd(v.x); v.y = chain_fwd(v.y); v.z = chain_fwd(v.z); v.w = chain_fwd(v.w);
            y4[i] = v;
        }
        return;
    }
#endif
    for (long long i = CNNC_TID; i < n; i += CNNC_STRIDE) y[i] = chain_fwd(x[i]);
}
#endif

#if COLS > 0 && !BWD
// z: the (rows, COLS) matrix product, row-major; the pre-activation is written back to z, the
// activation to y (which may be z itself)
extern "C" __global__ void __launch_bounds__(256) KERNEL(dense_fwd)(float* z, float* y, const float* bias, long long n) {
    for (long long i = CNNC_TID; i < n; i += CNNC_STRIDE) {
        float v = z[i];
#if BIAS
        v += bias[i % COLS];
#endif
        z[i] = v;
        y[i] = chain_fwd(v);
    }
}
#endif

#if BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(act_bwd_out)(const float* __restrict__ y,
                                                                    const float* __restrict__ dy,
                                                                    float* __restrict__ dx, long long n) {
#if VEC && COLS == 0
    if (aligned16(y) && aligned16(dy) && aligned16(dx)) {
        const float4* y4 = reinterpret_cast<const float4*>(y);
        const float4* g4 = reinterpret_cast<const float4*>(dy);
        float4* d4 = reinterpret_cast<float4*>(dx);
        for (long long i = CNNC_TID; i < n / 4; i += CNNC_STRIDE) {
            float4 v = y4[i], g = g4[i], r;
            r.x = chain_bwd_out(v.x, g.x); r.y = chain_bwd_out(v.y, g.y);
            r.z = chain_bwd_out(v.z, g.z); r.w = chain_bwd_out(v.w, g.w);
            d4[i] = r;
        }
        return;
    }
#endif
    for (long long i = CNNC_TID; i < n; i += CNNC_STRIDE) dx[i] = chain_bwd_out(y[i], dy[i]);
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(act_bwd_in)(const float* __restrict__ x,
                                                                   const float* __restrict__ dy,
                                                                   float* __restrict__ dx, long long n) {
#if VEC && COLS == 0
    if (aligned16(x) && aligned16(dy) && aligned16(dx)) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        const float4* g4 = reinterpret_cast<const float4*>(dy);
        float4* d4 = reinterpret_cast<float4*>(dx);
        for (long long i = CNNC_TID; i < n / 4; i += CNNC_STRIDE) {
            float4 v = x4[i], g = g4[i], r;
            r.x = chain_bwd_in(v.x, g.x); r.y = chain_bwd_in(v.y, g.y);
            r.z = chain_bwd_in(v.z, g.z); r.w = chain_bwd_in(v.w, g.w);
            d4[i] = r;
        }
        return;
    }
#endif
    for (long long i = CNNC_TID; i < n; i += CNNC_STRIDE) dx[i] = chain_bwd_in(x[i], dy[i]);
}
#endif

#if COLS > 0 && BWD
extern "C" __global__ void __launch_bounds__(256) KERNEL(bias_grad)(const float* __restrict__ dz,
                                                                  float* __restrict__ db, int rows) {
    for (long long j = CNNC_TID; j < COLS; j += CNNC_STRIDE) {
        float s = 0.0f;
        for (int r = 0; r < rows; ++r) s += dz[(long long)r * COLS + j];
        db[j] = s;
    }
}
#endif

#undef CNNC_TID
#undef CNNC_STRIDE
