// conv_dw.cu: direct depthwise convolution (GROUPS == C == K: one filter per channel), float32
// NCHW. A GEMM view would have one row per group; here each thread computes outputs directly.
//
// DW_PASS 0, forward with conv_fwd.cu's epilogue (HAS_BIAS, HAS_RESIDUAL, ACT, ARG0, ARG1, SAVE_PRE):
//   z = sum_(r,s) w[c][r][s] * x[img][c][p*STRIDE_H - PAD_T + r*DIL_H][q*STRIDE_W - PAD_L + s*DIL_W]
//       + bias[c] + residual[img][c][p][q]
//   y[img][c][p][q] = f(z) (op ACT of the generated header), z to pre[same index] with SAVE_PRE
//   one thread per output pixel; the channel's R*S weights in registers.
//   Launch conv_dw_fwd: grid (ceil(P*Q / DW_THREADS), C, N), block (DW_THREADS); (x, w, bias, res, y, pre, N).
// DW_PASS 1, backward:
//   conv_dw_bwd_data: one thread per input pixel (h, w), over the taps r whose
//     h + PAD_T - r*DIL_H is a non-negative multiple of STRIDE_H with quotient p < P (q likewise):
//     dx[img][c][h][w] = sum w[c][r][s] * dy[img][c][p][q].
//     Launch: grid (ceil(H*W / DW_THREADS), C, N), block (DW_THREADS); (dy, w, dx, N).
//   conv_dw_bwd_filter: block (c, split) sums dy * x over its range of t = img*P*Q + pq for all
//     R*S taps at once (registers), then one shared-memory tree reduction per tap. Writes
//     out[split][c][r][s] (dw itself when SPLITS == 1; else conv_reduce.cu adds the partials).
//     Launch: grid (C, SPLITS), block (DW_THREADS); (x, dy, out, N, per_split).
// Macros: C H W K R S P Q STRIDE_H STRIDE_W PAD_T PAD_L DIL_H DIL_W GROUPS DW_PASS, plus the
// epilogue's for pass 0 and SPLITS for pass 1.

constexpr int RS = R * S;
constexpr int HW = H * W;
constexpr int PQ = P * Q;
constexpr int DW_THREADS = 256;
static_assert(GROUPS == C && K == C, "depthwise: one filter per channel");

#if DW_PASS == 0

#include "cnnc/elementwise.cuh"

extern "C" __global__ void __launch_bounds__(DW_THREADS)
KERNEL(conv_dw_fwd)(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                    const float* __restrict__ res, float* __restrict__ y, float* __restrict__ pre, int batch) {
    const int pq = blockIdx.x * DW_THREADS + threadIdx.x;
    const int c = blockIdx.y;
    const int img = blockIdx.z;
    if (pq < PQ) {
        const int p = pq / Q;
        const int q = pq - p * Q;
        const int ih0 = p * STRIDE_H - PAD_T;
        const int iw0 = q * STRIDE_W - PAD_L;
        const float* __restrict__ xc = x + ((long long)img * C + c) * HW;
        const float* __restrict__ wc = w + c * RS;
        float acc = 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int ih = ih0 + r * DIL_H;
            if ((unsigned)ih < (unsigned)H) {
#pragma unroll
                for (int s = 0; s < S; ++s) {
                    const int iw = iw0 + s * DIL_W;
                    if ((unsigned)iw < (unsigned)W) acc = fmaf(__ldg(wc + r * S + s), __ldg(xc + ih * W + iw), acc);
                }
            }
        }
        const long long idx = ((long long)img * C + c) * PQ + pq;
        if constexpr (HAS_BIAS) acc += __ldg(bias + c);
        if constexpr (HAS_RESIDUAL) acc += __ldg(res + idx);
        if constexpr (SAVE_PRE) pre[idx] = acc;
        y[idx] = cnnc_act_fwd(ACT, acc, ARG0, ARG1);
    }
}

#else  // DW_PASS == 1

extern "C" __global__ void __launch_bounds__(DW_THREADS)
KERNEL(conv_dw_bwd_data)(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
                         int batch) {
    const int hw = blockIdx.x * DW_THREADS + threadIdx.x;
    const int c = blockIdx.y;
    const int img = blockIdx.z;
    if (hw < HW) {
        const int h = hw / W;
        const int ww = hw - h * W;
        const float* __restrict__ dyc = dy + ((long long)img * C + c) * PQ;
        const float* __restrict__ wc = w + c * RS;
        float acc = 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int th = h + PAD_T - r * DIL_H;
            const int p = th / STRIDE_H;
            if (th >= 0 && th - p * STRIDE_H == 0 && p < P) {
#pragma unroll
                for (int s = 0; s < S; ++s) {
                    const int tw = ww + PAD_L - s * DIL_W;
                    const int q = tw / STRIDE_W;
                    if (tw >= 0 && tw - q * STRIDE_W == 0 && q < Q)
                        acc = fmaf(__ldg(wc + r * S + s), __ldg(dyc + p * Q + q), acc);
                }
            }
        }
        dx[((long long)img * C + c) * HW + hw] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(DW_THREADS)
KERNEL(conv_dw_bwd_filter)(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out,
                           int batch, int per_split) {
    __shared__ float red[DW_THREADS];
    const int tid = threadIdx.x;
    const int c = blockIdx.x;
    const int split = blockIdx.y;
    const int total = batch * PQ;
    const int t0 = split * per_split;
    const int t1 = t0 + per_split < total ? t0 + per_split : total;
    float acc[RS];
#pragma unroll
    for (int i = 0; i < RS; ++i) acc[i] = 0.f;
    for (int t = t0 + tid; t < t1; t += DW_THREADS) {
        const int img = t / PQ;
        const int pq = t - img * PQ;
        const int p = pq / Q;
        const int q = pq - p * Q;
        const float gv = __ldg(dy + ((long long)img * C + c) * PQ + pq);
        const float* __restrict__ xc = x + ((long long)img * C + c) * HW;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int ih = p * STRIDE_H - PAD_T + r * DIL_H;
#pragma unroll
            for (int s = 0; s < S; ++s) {
                const int iw = q * STRIDE_W - PAD_L + s * DIL_W;
                if ((unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W)
                    acc[r * S + s] = fmaf(gv, __ldg(xc + ih * W + iw), acc[r * S + s]);
            }
        }
    }
    float* __restrict__ o = out + ((long long)split * C + c) * RS;
#pragma unroll
    for (int i = 0; i < RS; ++i) {  // unrolled: acc[i] stays in registers
        red[tid] = acc[i];
        __syncthreads();
#pragma unroll
        for (int s = DW_THREADS / 2; s > 0; s >>= 1) {
            if (tid < s) red[tid] += red[tid + s];
            __syncthreads();
        }
        if (tid == 0) o[i] = red[0];
        __syncthreads();  // red is rewritten for the next tap
    }
}

#endif
