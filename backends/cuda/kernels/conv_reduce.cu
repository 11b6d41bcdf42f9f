// conv_reduce.cu: out[i] = sum over s < splits of partial[s][i], in order (deterministic).
// Finishes the split-K weight gradient (conv_bwd_filter.cu, conv_dw.cu) and the split bias
// gradient (conv_bias.cu). No macros. Launch: grid (ceil(len / 256)), block (256);
// arguments (partial, out, len, splits).

constexpr int REDUCE_THREADS = 256;

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
KERNEL(reduce_splits)(const float* __restrict__ partial, float* __restrict__ out, int len, int splits) {
    const int i = blockIdx.x * REDUCE_THREADS + threadIdx.x;
    if (i < len) {
        float s = 0.f;
        for (int p = 0; p < splits; ++p) s += __ldg(partial + (long long)p * len + i);
        out[i] = s;
    }
}
