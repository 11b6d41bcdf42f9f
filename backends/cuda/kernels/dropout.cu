// Inverted dropout: out = in · mask, mask = keep ? 1/(1 − rate) : 0, keep drawn per element from a
// counter-based hash of (seed, element index). Forward (in = x) and backward (in = dy) call the same
// entry with the same seed, so the mask is never stored.
//
// Defines:
//   THRESH   keep ⇔ (hash >> 8) >= THRESH, THRESH = ceil(rate·2^24): a 24-bit uniform u keeps with
//            probability 1 − THRESH/2^24 ≈ 1 − rate (as NumPy's `random() >= rate`)
//   SCALE    1/(1 − rate)
//   VEC      1 when n is a multiple of 4 for every batch size: float4 path when aligned
//
// Entry: dropout_apply(in, out, n, seed)

__device__ __forceinline__ unsigned mix32(unsigned x) {  // "lowbias32" (C. Wellons): a bijection, good avalanche
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

__device__ __forceinline__ float keep_scale(unsigned seed, unsigned long long i) {
    unsigned h = mix32((unsigned)i ^ mix32(seed ^ 0x9e3779b9u));
    h = mix32(h ^ (unsigned)(i >> 32) ^ 0x85ebca6bu);
    return (h >> 8) >= (unsigned)THRESH ? SCALE : 0.0f;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (((unsigned long long)p) & 15ull) == 0; }

extern "C" __global__ void __launch_bounds__(256) KERNEL(dropout_apply)(const float* __restrict__ in,
                                                                      float* __restrict__ out, long long n,
                                                                      unsigned seed) {
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
#if VEC
    if (aligned16(in) && aligned16(out)) {
        const float4* i4 = reinterpret_cast<const float4*>(in);
        float4* o4 = reinterpret_cast<float4*>(out);
        for (long long q = start; q < n / 4; q += stride) {
            float4 v = i4[q];
            const unsigned long long e = 4ull * (unsigned long long)q;  // element index of v.x
            v.x *= keep_scale(seed, e);
            v.y *= keep_scale(seed, e + 1);
            v.z *= keep_scale(seed, e + 2);
            v.w *= keep_scale(seed, e + 3);
            o4[q] = v;
        }
        return;
    }
#endif
    for (long long i = start; i < n; i += stride) out[i] = in[i] * keep_scale(seed, (unsigned long long)i);
}
