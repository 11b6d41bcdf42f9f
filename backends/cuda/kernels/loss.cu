// Losses, with shapes as runtime arguments (one compiled spec serves every network).
//
// ce_fwd_bwd(logits, labels, grad, row_loss, bad, N, Cn, one_minus_eps, eps, eps_over_c, inv_n)
//   Softmax cross-entropy of (N, Cn) logits against int64 labels with label smoothing eps, as
//   torch.nn.functional.cross_entropy: one warp per row (blocks of 256 threads, 8 rows each).
//   z = x − max, lse = log Σ e^z, logp = z − lse;
//   row_loss[n] = −(1 − eps)·logp[label] − eps·mean(logp),  mean(logp) = Σz/Cn − lse;
//   grad[n, j] = (e^logp[j] − (1 − eps)·[j = label] − eps/Cn)·(1/N)  (d mean loss / d logits).
//   A label outside [0, Cn) adds 1 to *bad (its row is left NaN) for the host to report.
//
// mse_fwd_bwd(pred, target, grad, partial, n, scale)
//   grad = (pred − target)·scale with scale = 2/n; partial[block] = Σ (pred − target)² over the
//   block's elements, in double (blocks of 256 threads); the host adds the partials.

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

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(ce_fwd_bwd)(
        const float* __restrict__ logits, const long long* __restrict__ labels, float* __restrict__ grad,
        float* __restrict__ row_loss, int* __restrict__ bad, int N, int Cn, float one_minus_eps, float eps,
        float eps_over_c, float inv_n) {
    const int lane = threadIdx.x & 31;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < N; row += warps) {
        const float* xr = logits + row * Cn;
        float* gr = grad + row * Cn;
        const long long label = labels[row];
        if (label < 0 || label >= Cn) {  // the same for the whole warp
            if (lane == 0) {
                atomicAdd(bad, 1);
                row_loss[row] = __int_as_float(0x7fc00000);
            }
            for (int c = lane; c < Cn; c += 32) gr[c] = __int_as_float(0x7fc00000);
            continue;
        }
        float m = CNNC_NEG_INF;
        for (int c = lane; c < Cn; c += 32) m = fmaxf(m, xr[c]);
        m = warp_max(m);
        float se = 0.0f, sz = 0.0f;
        for (int c = lane; c < Cn; c += 32) {
            const float z = xr[c] - m;
            se += __expf(z);
            sz += z;
        }
        se = warp_sum(se);
        sz = warp_sum(sz);
        const float lse = __logf(se);
        const int lab = (int)label;
        if (lane == 0) {
            float loss = -one_minus_eps * (xr[lab] - m - lse);
            if (eps != 0.0f) loss -= eps * (sz / (float)Cn - lse);
            row_loss[row] = loss;
        }
        for (int c = lane; c < Cn; c += 32) {
            float g = __expf(xr[c] - m - lse);
            if (c == lab) g -= one_minus_eps;
            if (eps != 0.0f) g -= eps_over_c;
            gr[c] = g * inv_n;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(mse_fwd_bwd)(const float* __restrict__ pred,
                                                                    const float* __restrict__ target,
                                                                    float* __restrict__ grad,
                                                                    double* __restrict__ partial, long long n,
                                                                    float scale) {
    __shared__ double sh[8];
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float d = pred[i] - target[i];
        acc += (double)(d * d);
        grad[i] = d * scale;
    }
    acc = warp_sum_d(acc);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < (int)(blockDim.x >> 5); ++i) t += sh[i];
        partial[blockIdx.x] = t;
    }
}

#undef CNNC_NEG_INF
