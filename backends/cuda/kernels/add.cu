// Element-wise sum of up to four tensors of n elements: y = ((a + b) + c) + d, the first k of them
// (k = 2, 3 or 4), in the order NumPy's `y = x0 + x1; y += x2; ...` adds. More inputs: launch
// again with y as `a` (y may alias a: every element is read before it is written, by one thread).
//
// Defines:
//   VEC   1 when n is a multiple of 4 for every batch size: float4 path when the pointers are
//         16-byte aligned too
//
// Entry: add(a, b, c, d, y, n, k); unused inputs may be any valid pointer (never read).

__device__ __forceinline__ bool aligned16(const void* p) { return (((unsigned long long)p) & 15ull) == 0; }

__device__ __forceinline__ float4 add4(float4 u, float4 v) {
    return make_float4(u.x + v.x, u.y + v.y, u.z + v.z, u.w + v.w);
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(add)(const float* a, const float* b, const float* c,
                                                            const float* d, float* y, long long n, int k) {
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
#if VEC
    if (aligned16(a) && aligned16(b) && aligned16(c) && aligned16(d) && aligned16(y)) {
        const float4* a4 = reinterpret_cast<const float4*>(a);
        const float4* b4 = reinterpret_cast<const float4*>(b);
        const float4* c4 = reinterpret_cast<const float4*>(c);
        const float4* d4 = reinterpret_cast<const float4*>(d);
        float4* y4 = reinterpret_cast<float4*>(y);
        for (long long i = start; i < n / 4; i += stride) {
            float4 v = add4(a4[i], b4[i]);
            if (k > 2) v = add4(v, c4[i]);
            if (k > 3) v = add4(v, d4[i]);
            y4[i] = v;
        }
        return;
    }
#endif
    for (long long i = start; i < n; i += stride) {
        float v = a[i] + b[i];
        if (k > 2) v += c[i];
        if (k > 3) v += d[i];
        y[i] = v;
    }
}
