// conv_fwd_mma.cu: float32 NCHW convolution forward as an implicit GEMM on the tensor cores, with
// operands rounded to MMA (1 tf32, 2 bf16, 3 fp16) and float32 sums (tensor_tile.cuh), and
// conv_fwd.cu's fused epilogue (bias, residual, activation, SAVE_PRE).
//
// The GEMM view is conv_fwd.cu's, and so are the loaders (weights A and the gathered input B into
// double-buffered shared tiles As[k][m], Bs[k][n]) and the main loop: both kernels instantiate
// conv_tiles.cuh. What changes is who computes which outputs: a block of WARPS_M x WARPS_N warps
// covers BLOCK_M x BLOCK_N outputs, each warp a 32 x 32 tile (tensor_tile.cuh), and each lane
// stores the pairs of neighbouring columns of two rows its accumulators hold (scalar stores).
// In bf16 and fp16 the shared tiles are 16-bit rows, rounded as they are stored (run16).
//
// Runs where the plan computes in a reduced precision (`train: precision=tf32|bf16|fp16`), and
// for float32 plans with CNNC_TENSOR_CORES=1 (TF32 candidates for the tuner, as PyTorch's
// allow_tf32). Compiled for sm_90 and run on the CPU emulator by the tests.
//
// Macros: as conv_fwd.cu, plus MMA; THREAD_M and THREAD_N unused (the warp tile is fixed at 32 x 32).
// Launch: grid (ceil(N*P*Q / BLOCK_N), ceil(KG / BLOCK_M), GROUPS), block (BLOCK_M/32 * BLOCK_N/32 * 32).

#include "cnnc/conv_tiles.cuh"
#include "cnnc/elementwise.cuh"
#include "cnnc/tensor_tile.cuh"

constexpr int WARPS_M = BLOCK_M / 32;
constexpr int WARPS_N = BLOCK_N / 32;
constexpr int THREADS = WARPS_M * WARPS_N * 32;
// the weight and input tiles, their loaders and the main loop (conv_tiles.cuh)
using Tiles = CnncConvTiles<C, H, W, K, R, S, P, Q, STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, GROUPS, BLOCK_M,
                            BLOCK_N, BLOCK_K, THREADS>;
constexpr int KG = Tiles::KG, PQ = Tiles::PQ, APAD = Tiles::APAD, BPAD = Tiles::BPAD;
using Tile = CnncTensorTile<MMA, BLOCK_K, APAD, BPAD, WARPS_N>;

static_assert(BLOCK_M % 32 == 0 && BLOCK_N % 32 == 0, "whole 32 x 32 warp tiles");

__device__ __forceinline__ float act(float z) { return cnnc_act_fwd(ACT, z, ARG0, ARG1); }

extern "C" __global__ void __launch_bounds__(THREADS, Tiles::MIN_BLOCKS)
KERNEL(conv_fwd)(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                 const float* __restrict__ res, float* __restrict__ y, float* __restrict__ pre, int batch) {
    const int tid = threadIdx.x;
    const int n0 = blockIdx.x * BLOCK_N;
    const int m0 = blockIdx.y * BLOCK_M;
    const int g = blockIdx.z;
    const int ng = batch * PQ;  // GEMM columns

    Tiles tiles(x, n0, g, ng, tid);  // the thread's B columns, decoded once
    Tile tile(tid);
#if MMA >= 2  // bf16, fp16: 16-bit shared tiles, ldmatrix fragments
    tiles.run16<Tile::LD16>(w, g, m0, [](float v) { return Tile::bits16(v); },
                             [&](const unsigned short (*as)[Tile::LD16], const unsigned short (*bs)[Tile::LD16]) {
                                 tile.product16(as, bs);
                             });
#else
    tiles.run(w, g, m0, [&](const float (*as)[APAD], const float (*bs)[BPAD]) { tile.product(as, bs); });
#endif

    // ---- epilogue: bias, residual, activation; y[img][g*KG + m][pq] ---------------------------
    tile.each(m0, n0, [&](int m, int n, float v) {
        if (m < KG && n < ng) {
            const int img = n / PQ;
            const int k = g * KG + m;
            const long long idx = ((long long)img * K + k) * PQ + (n - img * PQ);
            float bv = 0.f, rv = 0.f;
            if constexpr (HAS_BIAS) bv = __ldg(bias + k);
            if constexpr (HAS_RESIDUAL) rv = __ldg(res + idx);
            const float zv = cnnc_pre_act<HAS_BIAS, HAS_RESIDUAL>(v, bv, rv);
            if constexpr (SAVE_PRE) pre[idx] = zv;
            y[idx] = act(zv);
        }
    });
}
