// conv_tiles.cuh: the operand tiles shared by the implicit-GEMM forward conv kernels (conv_fwd.cu,
// float32 FMAs; conv_fwd_mma.cu, tensor cores), included once per translation unit at file scope
// (source.py) and instantiated by each spec with its problem and tile constants.
//
// With conv_fwd.cu's GEMM view: the weight tile A (BLOCK_M filters x BLOCK_K reduction indices)
// and the gathered input tile B (BLOCK_K reduction indices x BLOCK_N pixels) go through registers
// into double-buffered shared memory As[k][m], Bs[k][n] (rows padded to APAD / BPAD floats); `run`
// is the main loop: the global loads of tile t+1 are issued before the kernel's tile product of
// tile t, and one __syncthreads per tile separates the buffers. Paths, from the constants:
//   - weights: 16-byte loads (float4 along k) when KRED % 4 == 0, else scalar loads;
//   - POINTWISE (1x1, stride 1, no padding, P == H, Q == W): B is the input itself, a plain GEMM
//     over channels, with 16-byte loads of 4 neighbouring pixels when H*W % 4 == 0;
//   - otherwise the im2col gather, one (c, r, s) decode per loaded element.
#ifndef CNNC_CONV_TILES_CUH
#define CNNC_CONV_TILES_CUH

template <int C, int H, int W, int K, int R, int S, int P, int Q, int STRIDE_H, int STRIDE_W, int PAD_T, int PAD_L,
          int DIL_H, int DIL_W, int GROUPS, int BLOCK_M, int BLOCK_N, int BLOCK_K, int THREADS>
struct CnncConvTiles {
    static constexpr int CG = C / GROUPS;  // input channels per group
    static constexpr int KG = K / GROUPS;  // filters per group
    static constexpr int RS = R * S;
    static constexpr int HW = H * W;
    static constexpr int PQ = P * Q;
    static constexpr int KRED = CG * RS;  // reduction length
    static constexpr int KTILES = (KRED + BLOCK_K - 1) / BLOCK_K;
    static constexpr int APAD = BLOCK_M + 4;  // padded shared rows: conflict-free transposed stores, 16-byte aligned
    static constexpr int BPAD = BLOCK_N + 4;
    static constexpr bool POINTWISE = R == 1 && S == 1 && STRIDE_H == 1 && STRIDE_W == 1 && PAD_T == 0
                                      && PAD_L == 0 && P == H && Q == W;
    // blocks per SM that __launch_bounds__ asks registers for: caps them at 128 for 256-thread
    // blocks (2 per SM), at 168 for smaller ones (3 blocks of 128 threads)
    static constexpr int REG_CAP = THREADS >= 256 ? 128 : 168;
    static constexpr int MIN_BLOCKS = 65536 / (THREADS * REG_CAP) > 0 ? 65536 / (THREADS * REG_CAP) : 1;
    static_assert(C % GROUPS == 0 && K % GROUPS == 0, "groups must divide channels and filters");
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");

    // ---- weight tile (A): BLOCK_M filters x BLOCK_K reduction indices -> As[k][m] -------------
    static constexpr bool A_VEC = KRED % 4 == 0;  // rows start 16-byte aligned, float4s never straddle KRED
    static constexpr int A_W = A_VEC ? 4 : 1;     // floats per load
    static constexpr int A_PER_ROW = BLOCK_K / A_W;      // loads per filter row of the tile
    static constexpr int A_UNITS = BLOCK_M * A_PER_ROW;  // loads per tile
    static constexpr int A_ITERS = (A_UNITS + THREADS - 1) / THREADS;
    static constexpr int A_REGS = A_ITERS * A_W;

    // ---- input tile (B): BLOCK_K reduction indices x BLOCK_N pixels -> Bs[k][n] ---------------
    // scalar mapping: a thread owns B_COLS columns (fixed for the whole kernel, so the pixel is
    // decoded once) and B_ROWS rows of each tile; consecutive threads take consecutive columns.
    static constexpr int B_NT = BLOCK_N < THREADS ? BLOCK_N : THREADS;  // threads across one tile row
    static constexpr int B_COLS = BLOCK_N / B_NT;
    static constexpr int B_RSTEP = THREADS / B_NT;
    static constexpr int B_ROWS = BLOCK_K / B_RSTEP;
    static_assert(BLOCK_N % B_NT == 0 && THREADS % B_NT == 0 && BLOCK_K % B_RSTEP == 0, "B tile mapping");
    // float4 mapping (pointwise, H*W % 4 == 0): a thread owns one quad of 4 columns
    static constexpr int B4_QN = BLOCK_N / 4;  // quads per tile row
    static constexpr bool B_VEC = POINTWISE && HW % 4 == 0 && THREADS % B4_QN == 0
                                  && BLOCK_K % (THREADS / B4_QN) == 0;
    static constexpr int B4_RSTEP = B_VEC ? THREADS / B4_QN : 1;
    static constexpr int B4_ROWS = B_VEC ? BLOCK_K / B4_RSTEP : 1;
    static constexpr int B_REGS = B_VEC ? 4 * B4_ROWS : B_COLS * B_ROWS;
    static constexpr int B_J = B_VEC ? 1 : B_COLS;  // decoded columns per thread

    // ---- the thread's B columns, decoded once ---------------------------------------------------
    // gather: xb = the image's group-g channel 0, (ih0, iw0) = the window's top-left corner
    // pointwise: xb as above, ih0 = the pixel's offset within a channel plane (iw0 unused)
    const float* xb[B_J];
    int ih0[B_J], iw0[B_J];
    bool cok[B_J];
    int tid, brow0, bcol0;

    __device__ __forceinline__ CnncConvTiles(const float* __restrict__ x, int n0, int g, int ng, int t) : tid(t) {
        if constexpr (B_VEC) {
            brow0 = tid / B4_QN;
            bcol0 = (tid % B4_QN) * 4;
        } else {
            brow0 = tid / B_NT;
            bcol0 = tid % B_NT;
        }
#pragma unroll
        for (int j = 0; j < B_J; ++j) {
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
    }

    // the weight tile kt into registers (zeros outside the filters and the reduction)
    __device__ __forceinline__ void load_a(const float* __restrict__ wg, int m0, int kt, float (&ar)[A_REGS]) const {
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

    // f(m, k, value) for each element of the weight tile the thread holds (m filter, k reduction)
    template <class F>
    __device__ __forceinline__ void each_a(const float (&ar)[A_REGS], F&& f) const {
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int e = tid + i * THREADS;
            if (A_UNITS % THREADS == 0 || e < A_UNITS) {
                const int m = e / A_PER_ROW;
                const int kl = (e % A_PER_ROW) * A_W;
#pragma unroll
                for (int v = 0; v < A_W; ++v) f(m, kl + v, ar[A_W * i + v]);
            }
        }
    }

    __device__ __forceinline__ void store_a(float (*as)[APAD], const float (&ar)[A_REGS]) const {
        each_a(ar, [&](int m, int k, float v) { as[k][m] = v; });
    }

    // the input tile kt into registers (zeros outside the image, the columns and the reduction)
    __device__ __forceinline__ void load_b(int kt, float (&br)[B_REGS]) const {
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
    }

    __device__ __forceinline__ void store_b(float (*bs)[BPAD], const float (&br)[B_REGS]) const {
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
    }

    // ---- the same tiles as 16-bit rows for the bf16 / fp16 tensor cores: as[m][k], bs[n][k]
    // (LD elements a row), each value converted once by cvt (tensor_tile.cuh's bits16)
    template <int LD, class Cvt>
    __device__ __forceinline__ void store_a16(unsigned short (*as)[LD], const float (&ar)[A_REGS], Cvt cvt) const {
        each_a(ar, [&](int m, int k, float v) { as[m][k] = cvt(v); });
    }

    template <int LD, class Cvt>
    __device__ __forceinline__ void store_b16(unsigned short (*bs)[LD], const float (&br)[B_REGS], Cvt cvt) const {
        if constexpr (B_VEC) {
#pragma unroll
            for (int i = 0; i < B4_ROWS; ++i)
#pragma unroll
                for (int q = 0; q < 4; ++q) bs[bcol0 + q][brow0 + i * B4_RSTEP] = cvt(br[4 * i + q]);
        } else {
#pragma unroll
            for (int i = 0; i < B_ROWS; ++i)
#pragma unroll
                for (int j = 0; j < B_COLS; ++j) bs[bcol0 + j * B_NT][brow0 + i * B_RSTEP] = cvt(br[i * B_COLS + j]);
        }
    }

    // `run` with 16-bit shared tiles (2 * (BLOCK_M + BLOCK_N) * LD * 2 bytes of shared memory)
    template <int LD, class Cvt, class Mma>
    __device__ __forceinline__ void run16(const float* __restrict__ w, int g, int m0, Cvt cvt, Mma&& mma) const {
        const float* __restrict__ wg = w + (long long)g * KG * KRED;
        __shared__ __align__(16) unsigned short As[2][BLOCK_M][LD];
        __shared__ __align__(16) unsigned short Bs[2][BLOCK_N][LD];
        float ar[A_REGS], br[B_REGS];
        load_a(wg, m0, 0, ar);
        load_b(0, br);
        store_a16<LD>(As[0], ar, cvt);
        store_b16<LD>(Bs[0], br, cvt);
        __syncthreads();
#pragma unroll 1
        for (int kt = 0; kt < KTILES; ++kt) {
            const int cur = kt & 1;
            const bool more = kt + 1 < KTILES;
            if (more) {
                load_a(wg, m0, kt + 1, ar);
                load_b(kt + 1, br);
            }
            mma(As[cur], Bs[cur]);
            if (more) {
                store_a16<LD>(As[cur ^ 1], ar, cvt);
                store_b16<LD>(Bs[cur ^ 1], br, cvt);
            }
            __syncthreads();
        }
    }

    // ---- main loop: double-buffered shared tiles, one barrier per tile; mma(as, bs) is the
    // kernel's product of one pair of shared tiles into its accumulators. The tiles are all the
    // shared memory a kernel uses (2 * BLOCK_K * (APAD + BPAD) floats).
    template <class Mma>
    __device__ __forceinline__ void run(const float* __restrict__ w, int g, int m0, Mma&& mma) const {
        const float* __restrict__ wg = w + (long long)g * KG * KRED;  // the group's weights
        __shared__ __align__(16) float As[2][BLOCK_K][APAD];
        __shared__ __align__(16) float Bs[2][BLOCK_K][BPAD];
        float ar[A_REGS], br[B_REGS];  // the next tile, between its global loads and its shared stores
        load_a(wg, m0, 0, ar);
        load_b(0, br);
        store_a(As[0], ar);
        store_b(Bs[0], br);
        __syncthreads();
#pragma unroll 1
        for (int kt = 0; kt < KTILES; ++kt) {
            const int cur = kt & 1;
            const bool more = kt + 1 < KTILES;
            if (more) {  // issue the next tile's global loads before this tile's product
                load_a(wg, m0, kt + 1, ar);
                load_b(kt + 1, br);
            }
            mma(As[cur], Bs[cur]);
            if (more) {  // the other buffer was last read before the previous barrier
                store_a(As[cur ^ 1], ar);
                store_b(Bs[cur ^ 1], br);
            }
            __syncthreads();
        }
    }
};

// the pre-activation z = acc + bias + residual of the fused epilogue
template <bool BIAS, bool RESIDUAL>
__device__ __forceinline__ float cnnc_pre_act(float acc, float bv, float rv) {
    float v = acc;
    if constexpr (BIAS) v += bv;
    if constexpr (RESIDUAL) v += rv;
    return v;
}

#endif  // CNNC_CONV_TILES_CUH
