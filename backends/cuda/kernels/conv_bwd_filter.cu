// conv_bwd_filter.cu: dW of a float32 NCHW convolution as an implicit GEMM with split-K.
//
//   dw[g*KG + m][c][r][s] = sum over img, p, q of  dy[img][g*KG + m][p][q] * x[img][g*CG + c][ih][iw]
//   ih = p*STRIDE_H - PAD_T + r*DIL_H, iw = q*STRIDE_W - PAD_L + s*DIL_W (zero outside the image).
//
// GEMM per group g:  dW[m][n] = sum_t A[m][t] * B[t][n]
//   m in [0, KG): the filter; n in [0, CRS = CG*R*S): n = (c*R + r)*S + s, the weight layout;
//   t in [0, N*P*Q): the reduction over images and output pixels, t = img*P*Q + p*Q + q;
//   A[m][t] = dy[img][g*KG + m][p][q]  (contiguous along t within an image);
//   B[t][n] = x[img][g*CG + c][ih][iw] (the forward's gather, with the roles of n and t swapped).
//
// Split-K: early layers have a long reduction (N*P*Q, e.g. 64*112*112) and a small output
// (K*CRS, e.g. 64*147), too few tiles to fill the GPU. SPLITS blocks share each output tile,
// each taking a contiguous range of `per_split` reduction indices (a multiple of BLOCK_K);
// blockIdx.z = g * SPLITS + split. With SPLITS == 1 the kernel writes dw directly; otherwise
// each split writes its partial sums to out[split][K*CRS] (no atomics: deterministic) and
// `reduce_splits` (conv_reduce.cu) adds the SPLITS partials in a fixed order.
//
// Same tiling as conv_fwd.cu: double-buffered shared tiles, THREAD_M x THREAD_N register
// blocks; dy is read as float4s along t when P*Q % 4 == 0 (4 neighbouring pixels of one image,
// 16-byte aligned since the split ranges start at multiples of BLOCK_K); float4 stores when
// CRS % 4 == 0.
//
// MMA 1, 2, 3 (tf32, bf16, fp16): the same loaders, split-K and main loop with the tile product
// on the tensor cores (tensor_tile.cuh: 32 x 32 outputs per warp, THREAD_M and THREAD_N unused)
// and scalar stores of each lane's accumulators; MMA 0: float32 FMAs in THREAD_M x THREAD_N blocks.
//
// Macros: C H W K R S P Q STRIDE_H STRIDE_W PAD_T PAD_L DIL_H DIL_W GROUPS, BLOCK_M BLOCK_N
// BLOCK_K THREAD_M THREAD_N SPLITS MMA.
// Launch: grid (ceil(CRS / BLOCK_N), ceil(KG / BLOCK_M), GROUPS * SPLITS), block (THREADS);
// arguments (x, dy, out, N, per_split) with per_split = BLOCK_K * ceil(ceil(N*P*Q / BLOCK_K) / SPLITS).

#include "cnnc/gemm_tile.cuh"
#include "cnnc/tensor_tile.cuh"

constexpr int CG = C / GROUPS;
constexpr int KG = K / GROUPS;
constexpr int RS = R * S;
constexpr int HW = H * W;
constexpr int PQ = P * Q;
constexpr int CRS = CG * RS;
constexpr int TM_T = MMA ? 1 : BLOCK_M / THREAD_M;  // (FMA) threads along a tile's rows
constexpr int TN_T = MMA ? 1 : BLOCK_N / THREAD_N;
constexpr int THREADS = MMA ? (BLOCK_M / 32) * (BLOCK_N / 32) * 32 : TM_T * TN_T;
// blocks per SM that __launch_bounds__ asks registers for: caps them at 128 for 256-thread
// blocks (2 per SM), at 168 for smaller ones (3 blocks of 128 threads)
constexpr int REG_CAP = THREADS >= 256 ? 128 : 168;
constexpr int MIN_BLOCKS = 65536 / (THREADS * REG_CAP) > 0 ? 65536 / (THREADS * REG_CAP) : 1;
constexpr int APAD = BLOCK_M + 4;
constexpr int BPAD = BLOCK_N + 4;

static_assert(C % GROUPS == 0 && K % GROUPS == 0, "groups must divide channels and filters");
static_assert(MMA || (THREAD_M % 4 == 0 && THREAD_N % 4 == 0), "register tiles are read as float4s");
static_assert(MMA ? BLOCK_M % 32 == 0 && BLOCK_N % 32 == 0 : BLOCK_M % THREAD_M == 0 && BLOCK_N % THREAD_N == 0,
              "tile sizes");
static_assert(BLOCK_K % 4 == 0, "BLOCK_K must be a multiple of 4");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");
static_assert(SPLITS >= 1, "SPLITS");

// ---- dy tile (A): BLOCK_M filters x BLOCK_K reduction indices -> As[t][m] ---------------------
// a thread's loads all sit at one reduction offset (THREADS % A_PER_COL == 0), so the
// (img, pq) decode happens once per tile
constexpr bool A_VEC = PQ % 4 == 0;
constexpr int A_W = A_VEC ? 4 : 1;
constexpr int A_PER_COL = BLOCK_K / A_W;     // loads along t per filter
constexpr int A_UNITS = BLOCK_M * A_PER_COL;
constexpr int A_ITERS = (A_UNITS + THREADS - 1) / THREADS;
constexpr int A_REGS = A_ITERS * A_W;
static_assert(THREADS % A_PER_COL == 0, "A tile mapping");

// ---- x tile (B): BLOCK_K reduction indices x BLOCK_N weights; a thread owns B_COLS columns ----
constexpr int B_NT = BLOCK_N < THREADS ? BLOCK_N : THREADS;
constexpr int B_COLS = BLOCK_N / B_NT;
constexpr int B_RSTEP = THREADS / B_NT;
constexpr int B_ROWS = BLOCK_K / B_RSTEP;
static_assert(BLOCK_N % B_NT == 0 && THREADS % B_NT == 0 && BLOCK_K % B_RSTEP == 0, "B tile mapping");

constexpr bool OUT_VEC = CRS % 4 == 0;

#if MMA
using Tile = CnncTensorTile<MMA, BLOCK_K, APAD, BPAD, BLOCK_N / 32>;
#else
// BLOCK_K rank-1 updates of the thread's THREAD_M x THREAD_N accumulators (gemm_tile.cuh)
__device__ __forceinline__ void mma_tile(const float (*as)[APAD], const float (*bs)[BPAD], int tm, int tn,
                                         float (&acc)[THREAD_M][THREAD_N]) {
    cnnc_mma_tile<BLOCK_K, THREAD_M, THREAD_N, TM_T, TN_T, APAD, BPAD>(as, bs, tm, tn, acc);
}
#endif

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
KERNEL(conv_bwd_filter)(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out,
                        int batch, int per_split) {
#if MMA >= 2  // bf16, fp16: 16-bit shared tiles As[m][t], Bs[n][t], rounded as they are stored
    __shared__ __align__(16) unsigned short As[2][BLOCK_M][Tile::LD16];
    __shared__ __align__(16) unsigned short Bs[2][BLOCK_N][Tile::LD16];
#else
    __shared__ __align__(16) float As[2][BLOCK_K][APAD];
    __shared__ __align__(16) float Bs[2][BLOCK_K][BPAD];
#endif

    const int tid = threadIdx.x;
    const int tn = tid % TN_T;
    const int tm = tid / TN_T;
    const int n0 = blockIdx.x * BLOCK_N;
    const int m0 = blockIdx.y * BLOCK_M;
    const int g = blockIdx.z / SPLITS;
    const int split = blockIdx.z % SPLITS;
    const int red = batch * PQ;
    const int t_begin = split * per_split;  // a multiple of BLOCK_K
    const int t_end = t_begin + per_split < red ? t_begin + per_split : red;
    const int ntiles = t_end > t_begin ? (t_end - t_begin + BLOCK_K - 1) / BLOCK_K : 0;

    // A mapping: t offset within the tile fixed per thread, filters m = a_m0 + i * A_MSTEP
    const int a_t = (tid % A_PER_COL) * A_W;
    const int a_m0 = tid / A_PER_COL;
    constexpr int A_MSTEP = THREADS / A_PER_COL;
    const float* __restrict__ dyg = dy + (long long)g * KG * PQ;  // image 0, group g's filter 0

    // B columns: the weight (c, r, s) decoded once
    const int brow0 = tid / B_NT;
    const int bcol0 = tid % B_NT;
    const float* xc[B_COLS];  // image 0, channel g*CG + c
    int roff[B_COLS], soff[B_COLS];
    bool cok[B_COLS];
#pragma unroll
    for (int j = 0; j < B_COLS; ++j) {
        const int n = n0 + bcol0 + j * B_NT;
        cok[j] = n < CRS;
        const int nn = cok[j] ? n : 0;
        const int c = nn / RS;
        const int rs = nn - c * RS;
        const int r = rs / S;
        const int s = rs - r * S;
        xc[j] = x + (long long)(g * CG + c) * HW;
        roff[j] = r * DIL_H - PAD_T;
        soff[j] = s * DIL_W - PAD_L;
    }

    float ar[A_REGS], br[B_COLS * B_ROWS];

    auto load = [&](int kt) {
        const int tb = t_begin + kt * BLOCK_K;
        {
            const int t = tb + a_t;
            const bool tok = t < t_end;  // (A_VEC: t % 4 == 0 and t_end % 4 == 0: the quad is whole)
            const int img = tok ? t / PQ : 0;
            const int pq = t - img * PQ;
            const float* __restrict__ src = dyg + (long long)img * K * PQ + pq;
#pragma unroll
            for (int i = 0; i < A_ITERS; ++i) {
                const int ml = a_m0 + i * A_MSTEP;
                const int m = m0 + ml;
                const bool ok = (A_UNITS % THREADS == 0 || ml < BLOCK_M) && tok && m < KG;
                if constexpr (A_VEC) {
                    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
                    if (ok) v = __ldg(reinterpret_cast<const float4*>(src + m * PQ));
                    ar[4 * i] = v.x;
                    ar[4 * i + 1] = v.y;
                    ar[4 * i + 2] = v.z;
                    ar[4 * i + 3] = v.w;
                } else {
                    ar[i] = ok ? __ldg(src + m * PQ) : 0.f;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < B_ROWS; ++i) {
            const int t = tb + brow0 + i * B_RSTEP;
            const bool tok = t < t_end;
            const int img = tok ? t / PQ : 0;
            const int pq = t - img * PQ;
            const int p = pq / Q;
            const int q = pq - p * Q;
            const long long iofs = (long long)img * C * HW;
#pragma unroll
            for (int j = 0; j < B_COLS; ++j) {
                const int ih = p * STRIDE_H + roff[j];
                const int iw = q * STRIDE_W + soff[j];
                float v = 0.f;
                if (tok && cok[j] && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W)
                    v = __ldg(xc[j] + iofs + ih * W + iw);
                br[i * B_COLS + j] = v;
            }
        }
    };
    auto store = [&](auto as, auto bs) {  // MMA >= 2: as[m][t], bs[n][t] in 16 bits; else as[t][m], bs[t][n]
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int ml = a_m0 + i * A_MSTEP;
            if (A_UNITS % THREADS == 0 || ml < BLOCK_M) {
#pragma unroll
                for (int v = 0; v < A_W; ++v) {
#if MMA >= 2
                    as[ml][a_t + v] = Tile::bits16(ar[A_W * i + v]);
#else
                    as[a_t + v][ml] = ar[A_W * i + v];
#endif
                }
            }
        }
        cnnc_store_b<(MMA >= 2), B_ROWS, B_COLS, B_RSTEP, B_NT>(bs, br, brow0, bcol0, [](float v) {
#if MMA >= 2
            return Tile::bits16(v);
#else
            return v;
#endif
        });
    };

#if MMA
    Tile tile(tid);
#else
    float acc[THREAD_M][THREAD_N];
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
        for (int j = 0; j < THREAD_N; ++j) acc[i][j] = 0.f;
#endif

    if (ntiles > 0) {  // uniform over the block
        load(0);
        store(As[0], Bs[0]);
        __syncthreads();
#pragma unroll 1
        for (int kt = 0; kt < ntiles; ++kt) {
            const int cur = kt & 1;
            const bool more = kt + 1 < ntiles;
            if (more) load(kt + 1);
#if MMA >= 2
            tile.product16(As[cur], Bs[cur]);
#elif MMA
            tile.product(As[cur], Bs[cur]);
#else
            mma_tile(As[cur], Bs[cur], tm, tn, acc);
#endif
            if (more) store(As[cur ^ 1], Bs[cur ^ 1]);
            __syncthreads();
        }
    }

    // ---- epilogue: out[split][g*KG + m][n] (out is dw itself when SPLITS == 1) -----------------
    float* __restrict__ o = out + (long long)split * K * CRS;
#if MMA
    tile.each(m0, n0, [&](int m, int n, float v) {
        if (m < KG && n < CRS) o[(long long)(g * KG + m) * CRS + n] = v;
    });
#else
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i) {
        const int m = m0 + ((i / 4) * TM_T + tm) * 4 + (i % 4);
        if (m < KG) {
            float* __restrict__ row = o + (long long)(g * KG + m) * CRS;
#pragma unroll
            for (int j4 = 0; j4 < THREAD_N / 4; ++j4) {
                const int n = n0 + (j4 * TN_T + tn) * 4;
                if constexpr (OUT_VEC) {
                    if (n < CRS)
                        *reinterpret_cast<float4*>(row + n) =
                            make_float4(acc[i][4 * j4], acc[i][4 * j4 + 1], acc[i][4 * j4 + 2], acc[i][4 * j4 + 3]);
                } else {
#pragma unroll
                    for (int jj = 0; jj < 4; ++jj)
                        if (n + jj < CRS) row[n + jj] = acc[i][4 * j4 + jj];
                }
            }
        }
    }
#endif
}
