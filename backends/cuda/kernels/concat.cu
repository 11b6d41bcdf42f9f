// Channel concatenation and its gradient: one launch per input, copying that input's channel
// block into (forward) or out of (backward) the concatenated tensor.
//
// Defines:
//   INNER   elements per channel (H·W, or 1 for flat features)
//   CTOT    channels of the concatenated tensor
//
// Entry: concat_copy(src, dst, N, seg, off, scatter)
//   seg = C_i·INNER, the input's elements per batch item; off = (channels before input i)·INNER.
//   Batch item n's block is part[n·seg + r] ↔ whole[n·CTOT·INNER + off + r], r < seg.
//   scatter = 1: whole = dst, part = src (forward); 0: part = dst, whole = src (backward).
//   Grid: x strides over r, y over the batch items.

__device__ __forceinline__ bool aligned16(const void* p) { return (((unsigned long long)p) & 15ull) == 0; }

template <typename T>
__device__ __forceinline__ void copy_blocks(const T* __restrict__ src, T* __restrict__ dst, int N, long long seg,
                                            long long off, long long whole, int scatter) {
    for (long long n = blockIdx.y; n < N; n += gridDim.y) {
        for (long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x; r < seg; r += (long long)gridDim.x * blockDim.x) {
            long long p = n * seg + r, w = n * whole + off + r;
            if (scatter) dst[w] = src[p];
            else dst[p] = src[w];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(concat_copy)(const float* __restrict__ src,
                                                                    float* __restrict__ dst, int N, long long seg,
                                                                    long long off, int scatter) {
    const long long whole = (long long)CTOT * INNER;
    if (seg % 4 == 0 && off % 4 == 0 && whole % 4 == 0 && aligned16(src) && aligned16(dst)) {
        copy_blocks<float4>(reinterpret_cast<const float4*>(src), reinterpret_cast<float4*>(dst), N, seg / 4,
                            off / 4, whole / 4, scatter);
    } else {
        copy_blocks<float>(src, dst, N, seg, off, whole, scatter);
    }
}
