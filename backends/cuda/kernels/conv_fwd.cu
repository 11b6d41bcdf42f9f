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
// tile t, and one __syncthreads per tile separates the buffers. Each thread accumulates
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
#include "cnnc/elementwise.cuh"

constexpr int CG = C / GROUPS;  // input channels per group
constexpr int KG = K / GROUPS;  // filters per group
constexpr int RS = R * S;
constexpr int HW = H * W;
constexpr int PQ = P * Q;
constexpr int KRED = CG * RS;   // reduction length
constexpr int TM_T = BLOCK_M / THREAD_M;  // threads along m
constexpr int TN_T = BLOCK_N / THREAD_N;  // threads along n
constexpr int THREADS = TM_T * TN_T;
// blocks per SM that __launch_bounds__ asks registers for: caps them at 128 for 256-thread
// blocks (2 per SM), at 168 for smaller ones (3 blocks of 128 threads)
constexpr int REG_CAP = THREADS >= 256 ? 128 : 168;
constexpr int MIN_BLOCKS = 65536 / (THREADS * REG_CAP) > 0 ? 65536 / (THREADS * REG_CAP) : 1;
constexpr int KTILES = (KRED + BLOCK_K - 1) / BLOCK_K;
constexpr int APAD = BLOCK_M + 4;  // padded shared rows: conflict-free transposed stores, 16-byte aligned
constexpr int BPAD = BLOCK_N + 4;
constexpr bool POINTWISE = R == 1 && S == 1 && STRIDE_H == 1 && STRIDE_W == 1 && PAD_T == 0 && PAD_L == 0
                           && P == H && Q == W;

static_assert(C % GROUPS == 0 && K % GROUPS == 0, "groups must divide channels and filters");
static_assert(THREAD_M % 4 == 0 && THREAD_N % 4 == 0, "register tiles are read as float4s");
static_assert(BLOCK_M % THREAD_M == 0 && BLOCK_N % THREAD_N == 0, "tile sizes");
static_assert(BLOCK_K % 4 == 0, "BLOCK_K must be a multiple of 4");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");

// ---- weight tile (A): BLOCK_M filters x BLOCK_K reduction indices -> As[k][m] ----------------
constexpr bool A_VEC = KRED % 4 == 0;               // rows start 16-byte aligned, float4s never straddle KRED
constexpr int A_W = A_VEC ? 4 : 1;                  // floats per load
constexpr int A_PER_ROW = BLOCK_K / A_W;            // loads per filter row of the tile
constexpr int A_UNITS = BLOCK_M * A_PER_ROW;        // loads per tile
constexpr int A_ITERS = (A_UNITS + THREADS - 1) / THREADS;
constexpr int A_REGS = A_ITERS * A_W;

// ---- input tile (B): BLOCK_K reduction indices x BLOCK_N pixels -> Bs[k][n] ------------------
// scalar mapping: a thread owns B_COLS columns (fixed for the whole kernel, so the pixel is
// decoded once) and B_ROWS rows of each tile; consecutive threads take consecutive columns.
constexpr int B_NT = BLOCK_N < THREADS ? BLOCK_N : THREADS;  // threads across one tile row
constexpr int B_COLS = BLOCK_N / B_NT;
constexpr int B_RSTEP = THREADS / B_NT;
constexpr int B_ROWS = BLOCK_K / B_RSTEP;
static_assert(BLOCK_N % B_NT == 0 && THREADS % B_NT == 0 && BLOCK_K % B_RSTEP == 0, "B tile mapping");
// float4 mapping (pointwise, H*W % 4 == 0): a thread owns one quad of 4 columns
constexpr int B4_QN = BLOCK_N / 4;  // quads per tile row
constexpr bool B_VEC = POINTWISE && HW % 4 == 0 && THREADS % B4_QN == 0 && BLOCK_K % (THREADS / B4_QN) == 0;
constexpr int B4_RSTEP = B_VEC ? THREADS / B4_QN : 1;
constexpr int B4_ROWS = B_VEC ? BLOCK_K / B4_RSTEP : 1;
constexpr int B_REGS = B_VEC ? 4 * B4_ROWS : B_COLS * B_ROWS;

constexpr bool OUT_VEC = PQ % 4 == 0;

// the pre-activation z = acc + bias + residual
__device__ __forceinline__ float pre_act(float acc, float bv, float rv) {
    float v = acc;
    if constexpr (HAS_BIAS) v += bv;
    if constexpr (HAS_RESIDUAL) v += rv;
    return v;
}

__device__ __forceinline__ float act(float z) { return cnnc_act_fwd(ACT, z, ARG0, ARG1); }

// the weight tile kt into registers (zeros outside the filters and the reduction)
__device__ __forceinline__ void load_a(const float* __restrict__ wg, int m0, int kt, int tid, float (&ar)[A_REGS]) {
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
        const int e = tid + i * THREADS;
        const int m = e / A_PER_ROW;
        const int kl = (e % A_PER_ROW) * A_W;
        const int gm = m0 + m;
        const int k = kt * BLOCK_K + kl;
        const bool ok = (A_UNITS % THREADS == 0 || e < A_UNITS) && gm < KG && k < KRED;
        if constexpr (A_VEC) {
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (ok) v = __ldg(reinterpret_cast<const float4*>(wg + gm * KRED + k));
            ar[4 * i] = v.x;
            ar[4 * i + 1] = v.y;
            ar[4 * i + 2] = v.z;
            ar[4 * i + 3] = v.w;
        } else {
            ar[i] = ok ? __ldg(wg + gm * KRED + k) : 0.f;
        }
    }
}

__device__ __forceinline__ void store_a(float (*as)[APAD], int tid, const float (&ar)[A_REGS]) {
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
        const int e = tid + i * THREADS;
        if (A_UNITS % THREADS == 0 || e < A_UNITS) {
            const int m = e / A_PER_ROW;
            const int kl = (e % A_PER_ROW) * A_W;
#pragma unroll
            for (int v = 0; v < A_W; ++v) as[kl + v][m] = ar[A_W * i + v];
        }
    }
}

// BLOCK_K rank-1 updates of the thread's THREAD_M x THREAD_N accumulators (gemm_tile.cuh)
__device__ __forceinline__ void mma_tile(const float (*as)[APAD], const float (*bs)[BPAD], int tm, int tn,
                                         float (&acc)[THREAD_M][THREAD_N]) {
    cnnc_mma_tile<BLOCK_K, THREAD_M, THREAD_N, TM_T, TN_T, APAD, BPAD>(as, bs, tm, tn, acc);
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
KERNEL(conv_fwd)(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                 const float* __restrict__ res, float* __restrict__ y, float* __restrict__ pre, int batch) {
    __shared__ __align__(16) float As[2][BLOCK_K][APAD];
    __shared__ __align__(16) float Bs[2][BLOCK_K][BPAD];

    const int tid = threadIdx.x;
    const int tn = tid % TN_T;
    const int tm = tid / TN_T;
    const int n0 = blockIdx.x * BLOCK_N;
    const int m0 = blockIdx.y * BLOCK_M;
    const int g = blockIdx.z;
    const int ng = batch * PQ;  // GEMM columns
    const float* __restrict__ wg = w + (long long)g * KG * KRED;

    // ---- the thread's B columns: pixel decoded once -------------------------------------------
    // gather: xb = the image's group-g channel 0, (ih0, iw0) = the window's top-left corner
    // pointwise: xb as above, ih0 = the pixel's offset within a channel plane (iw0 unused)
    const float* xb[B_VEC ? 1 : B_COLS];
    int ih0[B_VEC ? 1 : B_COLS], iw0[B_VEC ? 1 : B_COLS];
    bool cok[B_VEC ? 1 : B_COLS];
    int brow0, bcol0;
    if constexpr (B_VEC) {
        brow0 = tid / B4_QN;
        bcol0 = (tid % B4_QN) * 4;
    } else {
        brow0 = tid / B_NT;
        bcol0 = tid % B_NT;
    }
#pragma unroll
    for (int j = 0; j < (B_VEC ? 1 : B_COLS); ++j) {
        const int n = n0 + bcol0 + j * B_NT;
        cok[j] = n < ng;  // (B_VEC: n % 4 == 0 and ng % 4 == 0, so the whole quad is in range)
        const int nn = cok[j] ? n : 0;
        const int img = nn / PQ;
        const int pq = nn - img * PQ;
        const int p = pq / Q;
        const int q = pq - p * Q;
        xb[j] = x + ((long long)img * C + g * CG) * HW;
        if constexpr (POINTWISE) {
            ih0[j] = pq;  // offset within the plane
            iw0[j] = 0;
        } else {
            // a column past the end gets a window far above the image: the bounds test zeroes it
            ih0[j] = cok[j] ? p * STRIDE_H - PAD_T : -(1 << 28);
            iw0[j] = q * STRIDE_W - PAD_L;
        }
    }

    float ar[A_REGS], br[B_REGS];

    auto load_b = [&](int kt) {
        if constexpr (B_VEC) {
#pragma unroll
            for (int i = 0; i < B4_ROWS; ++i) {
                const int k = kt * BLOCK_K + brow0 + i * B4_RSTEP;
                float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
                if (cok[0] && k < KRED) v = __ldg(reinterpret_cast<const float4*>(xb[0] + k * HW + ih0[0]));
                br[4 * i] = v.x;
                br[4 * i + 1] = v.y;
                br[4 * i + 2] = v.z;
                br[4 * i + 3] = v.w;
            }
        } else {
#pragma unroll
            for (int i = 0; i < B_ROWS; ++i) {
                const int k = kt * BLOCK_K + brow0 + i * B_RSTEP;
                // the (c, r, s) of reduction index k (shared by the thread's columns)
                const int c = k / RS;
                const int rs = k - c * RS;
                const int r = rs / S;
                const int s = rs - r * S;
#pragma unroll
                for (int j = 0; j < B_COLS; ++j) {
                    float v = 0.f;
                    if constexpr (POINTWISE) {
                        if (cok[j] && k < KRED) v = __ldg(xb[j] + k * HW + ih0[j]);
                    } else {
                        const int ih = ih0[j] + r * DIL_H;
                        const int iw = iw0[j] + s * DIL_W;
                        if (k < KRED && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W)
                            v = __ldg(xb[j] + c * HW + ih * W + iw);
                    }
                    br[i * B_COLS + j] = v;
                }
            }
        }
    };
    auto store_b = [&](float (*bs)[BPAD]) {
        if constexpr (B_VEC) {
#pragma unroll
            for (int i = 0; i < B4_ROWS; ++i)
                *reinterpret_cast<float4*>(&bs[brow0 + i * B4_RSTEP][bcol0]) =
                    make_float4(br[4 * i], br[4 * i + 1], br[4 * i + 2], br[4 * i + 3]);
        } else {
#pragma unroll
            for (int i = 0; i < B_ROWS; ++i)
#pragma unroll
                for (int j = 0; j < B_COLS; ++j) bs[brow0 + i * B_RSTEP][bcol0 + j * B_NT] = br[i * B_COLS + j];
        }
    };

    float acc[THREAD_M][THREAD_N];
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
        for (int j = 0; j < THREAD_N; ++j) acc[i][j] = 0.f;

    // ---- main loop: double-buffered shared tiles, one barrier per tile -------------------------
    load_a(wg, m0, 0, tid, ar);
    load_b(0);
    store_a(As[0], tid, ar);
    store_b(Bs[0]);
    __syncthreads();
#pragma unroll 1
    for (int kt = 0; kt < KTILES; ++kt) {
        const int cur = kt & 1;
        const bool more = kt + 1 < KTILES;
        if (more) {  // issue the next tile's global loads before this tile's FMAs
            load_a(wg, m0, kt + 1, tid, ar);
            load_b(kt + 1);
        }
        mma_tile(As[cur], Bs[cur], tm, tn, acc);
        if (more) {  // the other buffer was last read before the previous barrier
            store_a(As[cur ^ 1], tid, ar);
            store_b(Bs[cur ^ 1]);
        }
        __syncthreads();
    }

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
