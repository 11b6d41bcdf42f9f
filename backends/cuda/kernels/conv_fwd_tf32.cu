// conv_fwd_tf32.cu: float32 NCHW convolution forward as an implicit GEMM on the tensor cores:
// mma.sync m16n8k8 with TF32 operands (inputs rounded to 10 mantissa bits, cvt.rna) and float32
// accumulation, with conv_fwd.cu's fused epilogue (bias, residual, activation, SAVE_PRE).
//
// The GEMM view, the loaders (weights A and the gathered input B into double-buffered shared
// tiles As[k][m], Bs[k][n]) and the main loop are conv_fwd.cu's, line for line; what changes is who
// computes which outputs. A block of WARPS_M x WARPS_N warps covers BLOCK_M x BLOCK_N outputs,
// each warp a 32 x 32 tile: 2 x 4 mma tiles of 16 x 8, reduction 8 per instruction. With
// gid = lane / 4 and tig = lane % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32):
//   A fragment (16 x 8, row): a0 = A[gid][tig], a1 = A[gid + 8][tig], a2 = A[gid][tig + 4],
//                             a3 = A[gid + 8][tig + 4]
//   B fragment (8 x 8, col):  b0 = B[tig][gid], b1 = B[tig + 4][gid]
//   C/D (16 x 8):             c0 = D[gid][2 tig], c1 = D[gid][2 tig + 1], c2 = D[gid + 8][2 tig],
//                             c3 = D[gid + 8][2 tig + 1]
// Shared rows are padded to BLOCK + 4 floats, so the 32 lanes of a fragment load (tig selects the
// row, gid the column) hit 32 different banks. Stores are scalar (each lane holds pairs of
// neighbouring columns of two rows).
//
// Not used unless enabled (conv.TENSOR_CORES; CNNC_TENSOR_CORES=1): TF32 rounds the inputs to
// about 3 decimal digits, a precision the float32 path does not give up by itself, and this kernel
// has been compiled (sm_90) and emulated (tests/backends/test_cuda_conv_tf32.py), not yet run on a GPU.
//
// Macros: as conv_fwd.cu; THREAD_M and THREAD_N unused (the warp tile is fixed at 32 x 32).
// Launch: grid (ceil(N*P*Q / BLOCK_N), ceil(KG / BLOCK_M), GROUPS), block (BLOCK_M/32 * BLOCK_N/32 * 32).

#include "cnnc/elementwise.cuh"

constexpr int CG = C / GROUPS;  // input channels per group
constexpr int KG = K / GROUPS;  // filters per group
constexpr int RS = R * S;
constexpr int HW = H * W;
constexpr int PQ = P * Q;
constexpr int KRED = CG * RS;   // reduction length
constexpr int WARPS_M = BLOCK_M / 32;
constexpr int WARPS_N = BLOCK_N / 32;
constexpr int THREADS = WARPS_M * WARPS_N * 32;
constexpr int MI = 2;  // mma tiles of 16 rows per warp
constexpr int NI = 4;  // mma tiles of 8 columns per warp
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
static_assert(BLOCK_M % 32 == 0 && BLOCK_N % 32 == 0, "whole 32 x 32 warp tiles");
static_assert(BLOCK_K % 8 == 0, "BLOCK_K: whole mma k-steps of 8");
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

__device__ __forceinline__ unsigned to_tf32(float v) {
    unsigned u;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(v));
    return u;
}

// one shared tile: BLOCK_K / 8 mma k-steps of the warp's MI x NI tiles (fragments as in the header)
__device__ __forceinline__ void mma_tile(const float (*as)[APAD], const float (*bs)[BPAD], int wm, int wn, int gid,
                                         int tig, float (&acc)[MI][NI][4]) {
#pragma unroll
    for (int k0 = 0; k0 < BLOCK_K; k0 += 8) {
        unsigned a[MI][4], b[NI][2];
#pragma unroll
        for (int i = 0; i < MI; ++i) {
            const int m = wm * 32 + i * 16 + gid;
            a[i][0] = to_tf32(as[k0 + tig][m]);
            a[i][1] = to_tf32(as[k0 + tig][m + 8]);
            a[i][2] = to_tf32(as[k0 + tig + 4][m]);
            a[i][3] = to_tf32(as[k0 + tig + 4][m + 8]);
        }
#pragma unroll
        for (int j = 0; j < NI; ++j) {
            const int n = wn * 32 + j * 8 + gid;
            b[j][0] = to_tf32(bs[k0 + tig][n]);
            b[j][1] = to_tf32(bs[k0 + tig + 4][n]);
        }
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
                asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                             "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                             : "+f"(acc[i][j][0]), "+f"(acc[i][j][1]), "+f"(acc[i][j][2]), "+f"(acc[i][j][3])
                             : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]), "r"(b[j][0]), "r"(b[j][1]));
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
KERNEL(conv_fwd)(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                 const float* __restrict__ res, float* __restrict__ y, float* __restrict__ pre, int batch) {
    __shared__ __align__(16) float As[2][BLOCK_K][APAD];
    __shared__ __align__(16) float Bs[2][BLOCK_K][BPAD];

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int gid = lane / 4, tig = lane % 4;
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

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

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
        mma_tile(As[cur], Bs[cur], wm, wn, gid, tig, acc);
        if (more) {  // the other buffer was last read before the previous barrier
            store_a(As[cur ^ 1], tid, ar);
            store_b(Bs[cur ^ 1]);
        }
        __syncthreads();
    }

    // ---- epilogue: bias, residual, activation; y[img][g*KG + m][pq], D's layout of the header ------
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int m = m0 + wm * 32 + i * 16 + gid + (c >= 2 ? 8 : 0);
                const int n = n0 + wn * 32 + j * 8 + tig * 2 + (c & 1);
                if (m < KG && n < ng) {
                    const int img = n / PQ;
                    const int k = g * KG + m;
                    const long long idx = ((long long)img * K + k) * PQ + (n - img * PQ);
                    float bv = 0.f, rv = 0.f;
                    if constexpr (HAS_BIAS) bv = __ldg(bias + k);
                    if constexpr (HAS_RESIDUAL) rv = __ldg(res + idx);
                    const float zv = pre_act(acc[i][j][c], bv, rv);
                    if constexpr (SAVE_PRE) pre[idx] = zv;
                    y[idx] = act(zv);
                }
            }
}
