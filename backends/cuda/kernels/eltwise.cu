// Element-wise activations and chains of them, and the dense layer's epilogue (bias + activation).
// float32; element-wise entries see the tensor as a flat array of n elements (any layout).
//
// Defines:
//   CHAIN_LEN          ops applied in order, 0..16 (a single activation is a chain of one)
//   CHAIN_OPS          op codes, 4 bits each, op i in bits [4i, 4i+4):
//                      1 relu, 2 relu6, 3 leaky_relu, 4 sigmoid, 5 tanh
//   SLOPE_0..SLOPE_15  leaky_relu slopes (only those of leaky ops are read; missing ones are 0)
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
//   BWD == 1:            act_bwd_out(y, dy, dx, n)        single op, derivative from its output:
//                                                          relu/relu6/leaky(slope >= 0)/sigmoid/tanh
//                        act_bwd_in(x, dy, dx, n)         any chain, recomputed from its input
//   COLS  > 0, BWD == 1: bias_grad(dz, db, rows)          db[j] = sum_r dz[r, j], one thread a column
//
// Accuracy: nvcc's --use_fast_math turns tanhf into tanh.approx (relative error ~2^-11), so tanh
// and sigmoid are written here from __expf (a few ulp) with a polynomial near zero (Cephes tanhf).

#ifndef SLOPE_0
#define SLOPE_0 0.0f
#endif
#ifndef SLOPE_1
#define SLOPE_1 0.0f
#endif
#ifndef SLOPE_2
#define SLOPE_2 0.0f
#endif
#ifndef SLOPE_3
#define SLOPE_3 0.0f
#endif
#ifndef SLOPE_4
#define SLOPE_4 0.0f
#endif
#ifndef SLOPE_5
#define SLOPE_5 0.0f
#endif
#ifndef SLOPE_6
#define SLOPE_6 0.0f
#endif
#ifndef SLOPE_7
#define SLOPE_7 0.0f
#endif
#ifndef SLOPE_8
#define SLOPE_8 0.0f
#endif
#ifndef SLOPE_9
#define SLOPE_9 0.0f
#endif
#ifndef SLOPE_10
#define SLOPE_10 0.0f
#endif
#ifndef SLOPE_11
#define SLOPE_11 0.0f
#endif
#ifndef SLOPE_12
#define SLOPE_12 0.0f
#endif
#ifndef SLOPE_13
#define SLOPE_13 0.0f
#endif
#ifndef SLOPE_14
#define SLOPE_14 0.0f
#endif
#ifndef SLOPE_15
#define SLOPE_15 0.0f
#endif

#define OP_RELU 1
#define OP_RELU6 2
#define OP_LEAKY 3
#define OP_SIGMOID 4
#define OP_TANH 5

__device__ __forceinline__ int op_at(int i) { return (int)((((unsigned long long)CHAIN_OPS) >> (4 * i)) & 15ull); }

__device__ __forceinline__ float slope_at(int i) {
    switch (i) {
        case 0: return SLOPE_0;   case 1: return SLOPE_1;   case 2: return SLOPE_2;   case 3: return SLOPE_3;
        case 4: return SLOPE_4;   case 5: return SLOPE_5;   case 6: return SLOPE_6;   case 7: return SLOPE_7;
        case 8: return SLOPE_8;   case 9: return SLOPE_9;   case 10: return SLOPE_10; case 11: return SLOPE_11;
        case 12: return SLOPE_12; case 13: return SLOPE_13; case 14: return SLOPE_14; default: return SLOPE_15;
    }
}

// tanh to a few ulp under --use_fast_math
__device__ __forceinline__ float tanh_acc(float x) {
    float a = fabsf(x);
    if (a < 0.625f) {  // odd polynomial (Cephes tanhf): x + x·z·P(z), z = x²
        float z = x * x;
        float p = -5.70498872745e-3f;
        p = p * z + 2.06390887954e-2f;
        p = p * z - 5.37397155531e-2f;
        p = p * z + 1.33314422036e-1f;
        p = p * z - 3.33332819422e-1f;
        return x + x * z * p;
    }
    float e = __expf(2.0f * fminf(a, 20.0f));  // tanh(20) is 1 in float32
    return copysignf(1.0f - __fdividef(2.0f, e + 1.0f), x);
}

// 1/(1 + e^-x), from e^-|x| in (0, 1]: no overflow, no cancellation
__device__ __forceinline__ float sigmoid_acc(float x) {
    float e = __expf(-fabsf(x));
    float r = __fdividef(1.0f, 1.0f + e);
    return x >= 0.0f ? r : e * r;
}

__device__ __forceinline__ float act_apply(int op, float s, float v) {
    switch (op) {
        case OP_RELU: return v > 0.0f ? v : 0.0f;
        case OP_RELU6: return fminf(fmaxf(v, 0.0f), 6.0f);
        case OP_LEAKY: return v > 0.0f ? v : v * s;
        case OP_SIGMOID: return sigmoid_acc(v);
        case OP_TANH: return tanh_acc(v);
        default: return v;
    }
}

// op'·g. `v` is the op's input for relu, relu6 and leaky_relu (for relu, relu6 and leaky_relu with
// a slope >= 0 the output serves as well: same sign tests), its output for sigmoid and tanh.
__device__ __forceinline__ float act_grad(int op, float s, float v, float g) {
    switch (op) {
        case OP_RELU: return v > 0.0f ? g : 0.0f;
        case OP_RELU6: return (v > 0.0f && v < 6.0f) ? g : 0.0f;  // zero at the kinks, as PyTorch
        case OP_LEAKY: return v > 0.0f ? g : g * s;
        case OP_SIGMOID: return g * v * (1.0f - v);
        case OP_TANH: return g * (1.0f - v * v);
        default: return g;
    }
}

__device__ __forceinline__ float chain_fwd(float v) {
#pragma unroll
    for (int i = 0; i < CHAIN_LEN; ++i) v = act_apply(op_at(i), slope_at(i), v);
    return v;
}

// d chain / d x · g, recomputing the chain from its input x, op after op (each Jacobian is
// diagonal, so the product can be taken in forward order)
__device__ __forceinline__ float chain_bwd_in(float z, float g) {
#pragma unroll
    for (int i = 0; i < CHAIN_LEN; ++i) {
        int op = op_at(i);
        float s = slope_at(i);
        if (op == OP_SIGMOID || op == OP_TANH) {  // derivative from the op's output
            z = act_apply(op, s, z);
            g = act_grad(op, s, z, g);
        } else {  // from its input
            g = act_grad(op, s, z, g);
            z = act_apply(op, s, z);
        }
    }
    return g;
}

__device__ __forceinline__ float chain_bwd_out(float y, float g) {
    return CHAIN_LEN >= 1 ? act_grad(op_at(0), slope_at(0), y, g) : g;
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
#undef OP_RELU
#undef OP_RELU6
#undef OP_LEAKY
#undef OP_SIGMOID
#undef OP_TANH
#undef SLOPE_0
#undef SLOPE_1
#undef SLOPE_2
#undef SLOPE_3
#undef SLOPE_4
#undef SLOPE_5
#undef SLOPE_6
#undef SLOPE_7
#undef SLOPE_8
#undef SLOPE_9
#undef SLOPE_10
#undef SLOPE_11
#undef SLOPE_12
#undef SLOPE_13
#undef SLOPE_14
#undef SLOPE_15
