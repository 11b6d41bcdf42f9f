// conv_fwd_tf32.cu: float32 NCHW convolution forward as an implicit GEMM on the tensor cores:
// mma.sync m16n8k8 with TF32 operands (inputs rounded to 10 mantissa bits, cvt.rna) and float32
// accumulation, with conv_fwd.cu's fused epilogue (bias, residual, activation, SAVE_PRE).
//
// The GEMM view is conv_fwd.cu's, and so are the loaders (weights A and the gathered input B into
// double-buffered shared tiles As[k][m], Bs[k][n]) and the main loop: both kernels instantiate
// conv_tiles.cuh. What changes is who computes which outputs. A block of WARPS_M x WARPS_N warps
// covers BLOCK_M x BLOCK_N outputs, each warp a 32 x 32 tile: 2 x 4 mma tiles of 16 x 8, reduction
// 8 per instruction. With gid = lane / 4 and tig = lane % 4 (PTX ISA, "Matrix Fragments for
// mma.m16n8k8", .tf32):
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

#include "cnnc/conv_tiles.cuh"
#include "cnnc/elementwise.cuh"

constexpr int WARPS_M = BLOCK_M / 32;
constexpr int WARPS_N = BLOCK_N / 32;
constexpr int THREADS = WARPS_M * WARPS_N * 32;
constexpr int MI = 2;  // mma tiles of 16 rows per warp
constexpr int NI = 4;  // mma tiles of 8 columns per warp
// the weight and input tiles, their loaders and the main loop (conv_tiles.cuh)
using Tiles = CnncConvTiles<C, H, W, K, R, S, P, Q, STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, GROUPS, BLOCK_M,
                            BLOCK_N, BLOCK_K, THREADS>;
constexpr int KG = Tiles::KG, PQ = Tiles::PQ, APAD = Tiles::APAD, BPAD = Tiles::BPAD;

static_assert(BLOCK_M % 32 == 0 && BLOCK_N % 32 == 0, "whole 32 x 32 warp tiles");
static_assert(BLOCK_K % 8 == 0, "BLOCK_K: whole mma k-steps of 8");

__device__ __forceinline__ float act(float z) { return cnnc_act_fwd(ACT, z, ARG0, ARG1); }

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

extern "C" __global__ void __launch_bounds__(THREADS, Tiles::MIN_BLOCKS)
KERNEL(conv_fwd)(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                 const float* __restrict__ res, float* __restrict__ y, float* __restrict__ pre, int batch) {
    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int gid = lane / 4, tig = lane % 4;
    const int n0 = blockIdx.x * BLOCK_N;
    const int m0 = blockIdx.y * BLOCK_M;
    const int g = blockIdx.z;
    const int ng = batch * PQ;  // GEMM columns

    Tiles tiles(x, n0, g, ng, tid);  // the thread's B columns, decoded once

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

    tiles.run(w, g, m0, [&](const float (*as)[APAD], const float (*bs)[BPAD]) {
        mma_tile(as, bs, wm, wn, gid, tig, acc);
    });

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
                    const float zv = cnnc_pre_act<HAS_BIAS, HAS_RESIDUAL>(acc[i][j][c], bv, rv);
                    if constexpr (SAVE_PRE) pre[idx] = zv;
                    y[idx] = act(zv);
                }
            }
}
