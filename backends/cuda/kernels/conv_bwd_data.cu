// conv_bwd_data.cu: dX of a float32 NCHW convolution (the transposed convolution of dY with
// the weights) as an implicit GEMM that skips the taps a stride makes useless.
//
//   dx[img][g*CG + c][h][w] = sum over k < KG, (r, s) of  w[g*KG + k][c][r][s] * dy[img][g*KG + k][p][q]
//   where h = p*STRIDE_H - PAD_T + r*DIL_H and w = q*STRIDE_W - PAD_L + s*DIL_W, that is
//   p = (h + PAD_T - r*DIL_H) / STRIDE_H when that is a whole number in [0, P) (likewise q).
//
// Stride phases: whether tap r can reach row h depends only on h mod STRIDE_H, so the rows
// split into STRIDE_H classes h = h0 + i*STRIDE_H (columns likewise). Each block works on one
// class (h0, w0) of one group (blockIdx.z = g * STRIDE_H*STRIDE_W + h0 * STRIDE_W + w0) and
// runs its reduction over the taps valid for that class only, listed in shared memory at the
// start: for a stride-2 3x3 conv a pixel class sees 4, 2, 2 or 1 of the 9 taps, never a zero.
//
// GEMM per (group, class):  dX[m][n] = sum_(tap, k) A[m][(tap, k)] * B[(tap, k)][n]
//   m = c in [0, CG); n = (img, i, j) flattened, n = (img * HC + i) * WC + j, HC = ceil(H/STRIDE_H),
//   WC = ceil(W/STRIDE_W) (the largest class; pixels h >= H of smaller classes are skipped);
//   reduction = valid taps x KG, tap-major: for each tap, k runs in tiles of BLOCK_K;
//   A[c][(tap, k)] = wt[g][tap][k][c], the weights transposed by `conv_wt` below so that a
//       tile row (fixed tap and k) is contiguous along c;
//   B[(tap, k)][n] = dy[img][g*KG + k][p][q] for the pixel's (p, q) at that tap, or zero.
// Pixels that no tap reaches (e.g. odd rows of a 1x1 stride-2 conv) get zero: every pixel of
// every class is written by exactly one block.
//
// Same tiling as conv_fwd.cu: double-buffered shared tiles, THREAD_M x THREAD_N register
// blocks, float4 weight loads when CG % 4 == 0 (no transpose needed: As[k][c] = a wt row),
// float4 stores when the stride is 1 and H*W % 4 == 0.
//
// MMA 1, 2, 3 (tf32, bf16, fp16): the same loaders and main loop with the tile product on the
// tensor cores (tensor_tile.cuh: 32 x 32 outputs per warp, THREAD_M and THREAD_N unused) and
// scalar stores of each lane's accumulators; MMA 0: float32 FMAs in THREAD_M x THREAD_N blocks.
//
// Macros: C H W K R S P Q STRIDE_H STRIDE_W PAD_T PAD_L DIL_H DIL_W GROUPS, BLOCK_M BLOCK_N
// BLOCK_K THREAD_M THREAD_N MMA.
// Launches: conv_wt: grid (ceil(K*CG*R*S / 256)), block (256);
//           conv_bwd_data: grid (ceil(N*HC*WC / BLOCK_N), ceil(CG / BLOCK_M), GROUPS*STRIDE_H*STRIDE_W),
//           block (THREADS).

#include "cnnc/gemm_tile.cuh"
#include "cnnc/tensor_tile.cuh"

constexpr int CG = C / GROUPS;
constexpr int KG = K / GROUPS;
constexpr int RS = R * S;
constexpr int HW = H * W;
constexpr int PQ = P * Q;
constexpr int HC = (H + STRIDE_H - 1) / STRIDE_H;  // rows of the largest phase class
constexpr int WC = (W + STRIDE_W - 1) / STRIDE_W;
constexpr int NPHASE = STRIDE_H * STRIDE_W;
constexpr int TM_T = MMA ? 1 : BLOCK_M / THREAD_M;  // (FMA) threads along a tile's rows
constexpr int TN_T = MMA ? 1 : BLOCK_N / THREAD_N;
constexpr int THREADS = MMA ? (BLOCK_M / 32) * (BLOCK_N / 32) * 32 : TM_T * TN_T;
// blocks per SM that __launch_bounds__ asks registers for: caps them at 128 for 256-thread
// blocks (2 per SM), at 168 for smaller ones (3 blocks of 128 threads)
constexpr int REG_CAP = THREADS >= 256 ? 128 : 168;
constexpr int MIN_BLOCKS = 65536 / (THREADS * REG_CAP) > 0 ? 65536 / (THREADS * REG_CAP) : 1;
constexpr int KT = (KG + BLOCK_K - 1) / BLOCK_K;  // k tiles per tap
constexpr int APAD = BLOCK_M + 4;
constexpr int BPAD = BLOCK_N + 4;
constexpr int WT_THREADS = 256;

static_assert(C % GROUPS == 0 && K % GROUPS == 0, "groups must divide channels and filters");
static_assert(MMA || (THREAD_M % 4 == 0 && THREAD_N % 4 == 0), "register tiles are read as float4s");
static_assert(MMA ? BLOCK_M % 32 == 0 && BLOCK_N % 32 == 0 : BLOCK_M % THREAD_M == 0 && BLOCK_N % THREAD_N == 0,
              "tile sizes");
static_assert(BLOCK_K % 4 == 0, "BLOCK_K must be a multiple of 4");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");

// ---- weight tile (A): BLOCK_K filters (rows) x BLOCK_M channels, straight from wt ------------
constexpr bool A_VEC = CG % 4 == 0;
constexpr int A_W = A_VEC ? 4 : 1;
constexpr int A_PER_ROW = BLOCK_M / A_W;      // loads per tile row (one filter k)
constexpr int A_UNITS = BLOCK_K * A_PER_ROW;
constexpr int A_ITERS = (A_UNITS + THREADS - 1) / THREADS;
constexpr int A_REGS = A_ITERS * A_W;

// ---- dy tile (B): BLOCK_K filters x BLOCK_N pixels; a thread owns B_COLS columns ---------------
constexpr int B_NT = BLOCK_N < THREADS ? BLOCK_N : THREADS;
constexpr int B_COLS = BLOCK_N / B_NT;
constexpr int B_RSTEP = THREADS / B_NT;
constexpr int B_ROWS = BLOCK_K / B_RSTEP;
static_assert(BLOCK_N % B_NT == 0 && THREADS % B_NT == 0 && BLOCK_K % B_RSTEP == 0, "B tile mapping");

constexpr bool OUT_VEC = STRIDE_H == 1 && STRIDE_W == 1 && HW % 4 == 0;

// the pixel (img, h, ww) of GEMM column n in the class (h0, w0); false past the batch or the image
__device__ __forceinline__ bool column_pixel(int n, int ncols, int h0, int w0, int& img, int& h, int& ww) {
    img = n / (HC * WC);
    const int rem = n - img * (HC * WC);
    const int ci = rem / WC;
    const int cj = rem - ci * WC;
    h = h0 + ci * STRIDE_H;
    ww = w0 + cj * STRIDE_W;
    return n < ncols && h < H && ww < W;
}

// wt[g][r*S + s][k][c] = w[g*KG + k][c][r][s]
extern "C" __global__ void __launch_bounds__(WT_THREADS)
KERNEL(conv_wt)(const float* __restrict__ w, float* __restrict__ wt) {
    const int e = blockIdx.x * WT_THREADS + threadIdx.x;  // index into wt
    if (e < K * CG * RS) {
        const int c = e % CG;
        int t = e / CG;
        const int k = t % KG;
        t /= KG;
        const int rs = t % RS;
        const int g = t / RS;
        wt[e] = __ldg(w + ((g * KG + k) * CG + c) * RS + rs);
    }
}

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
KERNEL(conv_bwd_data)(const float* __restrict__ dy, const float* __restrict__ wt, float* __restrict__ dx,
                      int batch) {
#if MMA >= 2  // bf16, fp16: 16-bit shared tiles As[c][k], Bs[n][k], rounded as they are stored
    __shared__ __align__(16) unsigned short As[2][BLOCK_M][Tile::LD16];
    __shared__ __align__(16) unsigned short Bs[2][BLOCK_N][Tile::LD16];
#else
    __shared__ __align__(16) float As[2][BLOCK_K][APAD];
    __shared__ __align__(16) float Bs[2][BLOCK_K][BPAD];
#endif
    __shared__ int taps[RS];
    __shared__ int ntaps_s;

    const int tid = threadIdx.x;
    const int tn = tid % TN_T;
    const int tm = tid / TN_T;
    const int n0 = blockIdx.x * BLOCK_N;
    const int m0 = blockIdx.y * BLOCK_M;
    const int g = blockIdx.z / NPHASE;
    const int phase = blockIdx.z % NPHASE;
    const int h0 = phase / STRIDE_W;
    const int w0 = phase % STRIDE_W;
    const int ncols = batch * HC * WC;

    // the taps that reach this class: (h0 + PAD_T - r*DIL_H) divisible by STRIDE_H, same for s
    if (tid == 0) {
        int nt = 0;
        for (int r = 0; r < R; ++r)
            for (int s = 0; s < S; ++s)
                if ((h0 + PAD_T - r * DIL_H) % STRIDE_H == 0 && (w0 + PAD_L - s * DIL_W) % STRIDE_W == 0)
                    taps[nt++] = r * S + s;
        ntaps_s = nt;
    }

    // the thread's B columns: pixel (img, h, w) decoded once
    const int brow0 = tid / B_NT;
    const int bcol0 = tid % B_NT;
    const float* dyb[B_COLS];  // dy of the image, group g's filter 0
    int ph[B_COLS], pw[B_COLS];  // h + PAD_T, w + PAD_L
    bool pix[B_COLS];
#pragma unroll
    for (int j = 0; j < B_COLS; ++j) {
        const int n = n0 + bcol0 + j * B_NT;
        const int img = n / (HC * WC);
        const int rem = n - img * (HC * WC);
        const int ci = rem / WC;
        const int cj = rem - ci * WC;
        const int h = h0 + ci * STRIDE_H;
        const int ww = w0 + cj * STRIDE_W;
        pix[j] = n < ncols && h < H && ww < W;
        dyb[j] = dy + ((long long)(pix[j] ? img : 0) * K + g * KG) * PQ;
        ph[j] = h + PAD_T;
        pw[j] = ww + PAD_L;
    }
    __syncthreads();
    const int nstages = ntaps_s * KT;

    float ar[A_REGS], br[B_COLS * B_ROWS];

    auto load = [&](int st) {
        const int tap = taps[st / KT];
        const int k0 = (st % KT) * BLOCK_K;
        const int r = tap / S;
        const int s = tap - r * S;
        const float* __restrict__ wtile = wt + ((long long)(g * RS + tap) * KG) * CG;  // wt[g][tap][0][0]
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int e = tid + i * THREADS;
            const int kl = e / A_PER_ROW;
            const int ml = (e % A_PER_ROW) * A_W;
            const int k = k0 + kl;
            const int c = m0 + ml;
            const bool ok = (A_UNITS % THREADS == 0 || e < A_UNITS) && k < KG && c < CG;
            if constexpr (A_VEC) {
                float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
                if (ok) v = __ldg(reinterpret_cast<const float4*>(wtile + k * CG + c));
                ar[4 * i] = v.x;
                ar[4 * i + 1] = v.y;
                ar[4 * i + 2] = v.z;
                ar[4 * i + 3] = v.w;
            } else {
                ar[i] = ok ? __ldg(wtile + k * CG + c) : 0.f;
            }
        }
#pragma unroll
        for (int j = 0; j < B_COLS; ++j) {
            // the output pixel (p, q) this tap reads for the column's input pixel
            const int th = ph[j] - r * DIL_H;  // a multiple of STRIDE_H for a valid tap
            const int tw = pw[j] - s * DIL_W;
            const int p = th / STRIDE_H;
            const int q = tw / STRIDE_W;
            const bool ok = pix[j] && th >= 0 && tw >= 0 && p < P && q < Q;
            const int off = ok ? p * Q + q : 0;
#pragma unroll
            for (int i = 0; i < B_ROWS; ++i) {
                const int k = k0 + brow0 + i * B_RSTEP;
                br[i * B_COLS + j] = (ok && k < KG) ? __ldg(dyb[j] + k * PQ + off) : 0.f;
            }
        }
    };
    auto store = [&](auto as, auto bs) {  // MMA >= 2: as[c][k], bs[n][k] in 16 bits; else as[k][c], bs[k][n]
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int e = tid + i * THREADS;
            if (A_UNITS % THREADS == 0 || e < A_UNITS) {
                const int kl = e / A_PER_ROW;
                const int ml = (e % A_PER_ROW) * A_W;
#if MMA >= 2
#pragma unroll
                for (int v = 0; v < A_W; ++v) as[ml + v][kl] = Tile::bits16(ar[A_W * i + v]);
#else
                if constexpr (A_VEC) {
                    *reinterpret_cast<float4*>(&as[kl][ml]) = make_float4(ar[4 * i], ar[4 * i + 1], ar[4 * i + 2], ar[4 * i + 3]);
                } else {
                    as[kl][ml] = ar[i];
                }
#endif
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

    if (nstages > 0) {  // uniform over the block
        load(0);
        store(As[0], Bs[0]);
        __syncthreads();
#pragma unroll 1
        for (int st = 0; st < nstages; ++st) {
            const int cur = st & 1;
            const bool more = st + 1 < nstages;
            if (more) load(st + 1);
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

#if MMA
    // ---- epilogue: dx[img][g*CG + c][h][w], each accumulator where its lane's fragment puts it ---
#pragma unroll
    for (int j = 0; j < Tile::NI; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {  // the lane's two columns of mma tile j (c & 1)
            int img, h, ww;
            if (column_pixel(n0 + tile.col(j, e), ncols, h0, w0, img, h, ww)) {
                const long long cofs = (long long)img * C * HW + h * W + ww;
#pragma unroll
                for (int i = 0; i < Tile::MI; ++i)
#pragma unroll
                    for (int hi = 0; hi < 2; ++hi) {  // rows gid and gid + 8 (c >= 2)
                        const int c = m0 + tile.row(i, 2 * hi + e);
                        if (c < CG) dx[cofs + (long long)(g * CG + c) * HW] = tile.acc[i][j][2 * hi + e];
                    }
            }
        }
#else
    // ---- epilogue: dx[img][g*CG + c][h][w], one column at a time (decoded once, then all rows) ---
#pragma unroll
    for (int j = 0; j < THREAD_N; ++j) {
        // with OUT_VEC (stride 1, HC = H, WC = W, H*W % 4 == 0) a quad's 4 columns are 4
        // neighbouring pixels of one image, 16-byte aligned, and whole: only j % 4 == 0 stores
        if (OUT_VEC && j % 4 != 0) continue;
        int img, h, ww;
        if (column_pixel(n0 + ((j / 4) * TN_T + tn) * 4 + (j % 4), ncols, h0, w0, img, h, ww)) {
            const long long cofs = (long long)img * C * HW + h * W + ww;
#pragma unroll
            for (int i = 0; i < THREAD_M; ++i) {
                const int c = m0 + ((i / 4) * TM_T + tm) * 4 + (i % 4);
                if (c < CG) {
                    float* __restrict__ dst = dx + cofs + (long long)(g * CG + c) * HW;
                    if constexpr (OUT_VEC) {
                        *reinterpret_cast<float4*>(dst) = make_float4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3]);
                    } else {
                        *dst = acc[i][j];
                    }
                }
            }
        }
    }
#endif
}
