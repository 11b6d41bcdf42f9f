// conv_fwd.cu: float32 NCHW convolution forward as an implicit GEMM, with a fused epilogue
// (bias, residual, activation), so that the same template serves `conv` and `fused_conv`.
//
// GEMM view, per group g = blockIdx.z:
//   Y[m][n] = sum_k A[m][k] * B[k][n]
//   m in [0, KG):    the filter within the group (KG = K / GROUPS rows)
//   n in [0, N*P*Q): output pixel n = (img * P + p) * Q + q, N (the batch) a runtime argument
//   k in [0, KRED):  k = (c * R + r) * S + s, c the input channel within the group; KRED = CG*R*S.
//                    This is the order of the weight tensor (K, CG, R, S), so A is the weight
//                    tensor itself: row m of group g starts at w + (g * KG + m) * KRED.
//   B[k][n] = x[img][g * CG + c][ih][iw], ih = p * STRIDE_H - PAD_T + r * DIL_H,
//             iw = q * STRIDE_W - PAD_L + s * DIL_W, zero where (ih, iw) lies outside the image.
//             That one test covers every padding: the bottom/right padding and the ceil
//             overhang read zeros, and with floor rounding the rows past the last window are
//             never addressed (P and Q come from the compiler's shape rule).
//   z = Y[m][n] + bias[g * KG + m] + residual[same index]
//   y[img][g * KG + m][p][q] = f(z), f op ACT of the generated header (elementwise.py); with
//   SAVE_PRE (training, where f's derivative reads its input) z goes to pre[same index] too
//
// Tiling: a block computes a BLOCK_M x BLOCK_N tile of Y, stepping through the reduction
// BLOCK_K at a time. Tiles of A (weights) and B (gathered input) go through registers into
// double-buffered shared memory: the global loads of tile t+1 are issued before the FMAs of
// tile t, and one __syncthreads per tile separates the buffers (the loaders and this main loop are
// conv_tiles.cuh's, shared with conv_fwd_mma.cu). Each thread accumulates
// THREAD_M x THREAD_N outputs in registers (2-D register blocking), reading float4s from
// shared memory: its rows are m = (i/4 * TM_T + tm) * 4 + i%4, its columns likewise, so that
// neighbouring threads read neighbouring float4s (no bank conflicts).
//
// Paths, chosen at compile time from the problem constants:
//   - weights: 16-byte loads (float4 along k) when KRED % 4 == 0, else scalar loads;
//   - POINTWISE (1x1, stride 1, no padding, P == H, Q == W): B is the input itself, a plain
//     GEMM over channels: B[c][n] = x[img][g*CG + c][pq], no im2col index arithmetic; with
//     16-byte loads of 4 neighbouring pixels when H*W % 4 == 0;
//   - otherwise the gather above, one (c, r, s) decode per loaded element;
//   - stores: float4 when P*Q % 4 == 0 (4 neighbouring columns are then 4 neighbouring pixels
//     of one image, 16-byte aligned), else scalar.
// Depthwise convolutions (GROUPS == C == K) use conv_dw.cu instead.
//
// Macros: C H W K R S P Q STRIDE_H STRIDE_W PAD_T PAD_L DIL_H DIL_W GROUPS (problem),
// BLOCK_M BLOCK_N BLOCK_K THREAD_M THREAD_N (tiles), HAS_BIAS HAS_RESIDUAL ACT ARG0 ARG1 SAVE_PRE
// (epilogue: ACT 0 none, else an op code of the generated header; ARG0, ARG1 its formula arguments).
// Launch: grid (ceil(N*P*Q / BLOCK_N), ceil(KG / BLOCK_M), GROUPS), block (THREADS);
// arguments (x, w, bias, res, y, pre, N); bias, res, pre may be any array when unused.

#include "cnnc/gemm_tile.cuh"
#include "cnnc/conv_tiles.cuh"
#include "cnnc/elementwise.cuh"

constexpr int TM_T = BLOCK_M / THREAD_M;  // threads along m
constexpr int TN_T = BLOCK_N / THREAD_N;  // threads along n
constexpr int THREADS = TM_T * TN_T;
// the weight and input tiles, their loaders and the main loop (conv_tiles.cuh)
using Tiles = CnncConvTiles<C, H, W, K, R, S, P, Q, STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, GROUPS, BLOCK_M,
                            BLOCK_N, BLOCK_K, THREADS>;
constexpr int KG = Tiles::KG, PQ = Tiles::PQ, APAD = Tiles::APAD, BPAD = Tiles::BPAD;

static_assert(THREAD_M % 4 == 0 && THREAD_N % 4 == 0, "register tiles are read as float4s");
static_assert(BLOCK_M % THREAD_M == 0 && BLOCK_N % THREAD_N == 0, "tile sizes");
static_assert(BLOCK_K % 4 == 0, "BLOCK_K must be a multiple of 4");

constexpr bool OUT_VEC = PQ % 4 == 0;

__device__ __forceinline__ float pre_act(float acc, float bv, float rv) {
    return cnnc_pre_act<HAS_BIAS, HAS_RESIDUAL>(acc, bv, rv);
}

__device__ __forceinline__ float act(float z) { return cnnc_act_fwd(ACT, z, ARG0, ARG1); }

// BLOCK_K rank-1 updates of the thread's THREAD_M x THREAD_N accumulators (gemm_tile.cuh)
__device__ __forceinline__ void mma_tile(const float (*as)[APAD], const float (*bs)[BPAD], int tm, int tn,
                                         float (&acc)[THREAD_M][THREAD_N]) {
    cnnc_mma_tile<BLOCK_K, THREAD_M, THREAD_N, TM_T, TN_T, APAD, BPAD>(as, bs, tm, tn, acc);
}

extern "C" __global__ void __launch_bounds__(THREADS, Tiles::MIN_BLOCKS)
KERNEL(conv_fwd)(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                 const float* __restrict__ res, float* __restrict__ y, float* __restrict__ pre, int batch) {
    const int tid = threadIdx.x;
    const int tn = tid % TN_T;
    const int tm = tid / TN_T;
    const int n0 = blockIdx.x * BLOCK_N;
    const int m0 = blockIdx.y * BLOCK_M;
    const int g = blockIdx.z;
    const int ng = batch * PQ;  // GEMM columns

    Tiles tiles(x, n0, g, ng, tid);  // the thread's B columns, decoded once

    float acc[THREAD_M][THREAD_N];
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
        for (int j = 0; j < THREAD_N; ++j) acc[i][j] = 0.f;

    tiles.run(w, g, m0, [&](const float (*as)[APAD], const float (*bs)[BPAD]) {
        mma_tile(as, bs, tm, tn, acc);
    });

    // ---- epilogue: bias, residual, activation; y[img][g*KG + m][pq] ------------------------------
    // one quad of 4 neighbouring columns at a time (decoded once, then all the thread's rows)
#pragma unroll
    for (int j4 = 0; j4 < THREAD_N / 4; ++j4) {
        const int nq = n0 + (j4 * TN_T + tn) * 4;  // the quad's first column
        if (nq < ng) {
            if constexpr (OUT_VEC) {
                // PQ % 4 == 0 and nq % 4 == 0: the quad is 4 neighbouring pixels of one image,
                // 16-byte aligned, and whole (ng % 4 == 0)
                const int img = nq / PQ;
                const long long cofs = (long long)img * K * PQ + (nq - img * PQ);
#pragma unroll
                for (int i = 0; i < THREAD_M; ++i) {
                    const int m = m0 + ((i / 4) * TM_T + tm) * 4 + (i % 4);
                    if (m < KG) {
                        const int k = g * KG + m;
                        float bv = 0.f;
                        if constexpr (HAS_BIAS) bv = __ldg(bias + k);
                        const long long idx = cofs + (long long)k * PQ;
                        float4 r4 = make_float4(0.f, 0.f, 0.f, 0.f);
                        if constexpr (HAS_RESIDUAL) r4 = __ldg(reinterpret_cast<const float4*>(res + idx));
                        float4 zq, o;
                        zq.x = pre_act(acc[i][4 * j4], bv, r4.x);
                        zq.y = pre_act(acc[i][4 * j4 + 1], bv, r4.y);
                        zq.z = pre_act(acc[i][4 * j4 + 2], bv, r4.z);
                        zq.w = pre_act(acc[i][4 * j4 + 3], bv, r4.w);
                        if constexpr (SAVE_PRE) *reinterpret_cast<float4*>(pre + idx) = zq;
                        o.x = act(zq.x);
                        o.y = act(zq.y);
                        o.z = act(zq.z);
                        o.w = act(zq.w);
                        *reinterpret_cast<float4*>(y + idx) = o;
                    }
                }
            } else {
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) {
                    const int n = nq + jj;
                    if (n < ng) {
                        const int img = n / PQ;
                        const long long cofs = (long long)img * K * PQ + (n - img * PQ);
#pragma unroll
                        for (int i = 0; i < THREAD_M; ++i) {
                            const int m = m0 + ((i / 4) * TM_T + tm) * 4 + (i % 4);
                            if (m < KG) {
                                const int k = g * KG + m;
                                float bv = 0.f;
                                if constexpr (HAS_BIAS) bv = __ldg(bias + k);
                                const long long idx = cofs + (long long)k * PQ;
                                float rv = 0.f;
                                if constexpr (HAS_RESIDUAL) rv = __ldg(res + idx);
                                const float zv = pre_act(acc[i][4 * j4 + jj], bv, rv);
                                if constexpr (SAVE_PRE) pre[idx] = zv;
                                y[idx] = act(zv);
                            }
                        }
                    }
                }
            }
        }
    }
}
