// tensor_tile.cuh: the tensor-core product of one pair of shared tiles, shared by the implicit-GEMM
// conv kernels (conv_fwd_mma.cu, and conv_bwd_data.cu / conv_bwd_filter.cu built with MMA != 0),
// included once per translation unit at file scope (source.py).
//
// The tiles are the float32 kernels' own: As[k][m] (BLOCK_K reduction rows of BLOCK_M outputs'
// operands) and Bs[k][n], rows padded to AP / BP floats. A block of (BLOCK_M/32) x (BLOCK_N/32)
// warps covers the tile, each warp 32 x 32 outputs as 2 x 4 mma tiles of 16 x 8. Operands stay
// float32 in memory and are rounded to the precision as each lane loads its fragments, so the
// products are those of operands rounded to nearest, ties to even, as the NumPy backend's
// emulation rounds them (backends/numpy/precision.py); sums are float32.
//
//   PREC 1  tf32  mma.m16n8k8  .tf32 (cvt.rn.tf32.f32: 10 mantissa bits, float32's range)
//   PREC 2  bf16  mma.m16n8k16 .bf16 (cvt.rn.bf16x2.f32: 7 mantissa bits, float32's range)
//   PREC 3  fp16  mma.m16n8k16 .f16  (cvt.rn.f16x2.f32: 10 mantissa bits, 5-bit exponent)
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k8 / m16n8k16"; gid = lane / 4, tig = lane % 4):
//   tf32 A (16 x 8):  a0 (gid, tig), a1 (gid + 8, tig), a2 (gid, tig + 4), a3 (gid + 8, tig + 4)
//        B (8 x 8):   b0 (tig, gid), b1 (tig + 4, gid)
//   16-bit A (16 x 16), two elements per register, the lower column in the low half:
//                     a0 (gid, 2tig..2tig+1), a1 (gid + 8, 2tig..), a2 (gid, 2tig+8..), a3 (gid + 8, 2tig+8..)
//        B (16 x 8):  b0 (2tig..2tig+1, gid), b1 (2tig+8..2tig+9, gid)
//   C/D (16 x 8), every precision: c0 (gid, 2tig), c1 (gid, 2tig + 1), c2 (gid + 8, 2tig), c3 (gid + 8, 2tig + 1)
// `row(i, c)` and `col(j, c)` give the block-tile coordinates of accumulator acc[i][j][c]; `each`
// visits them all.
//
// For bf16 and fp16 the kernels store their shared tiles already rounded, as 16-bit [m][k] and
// [n][k] rows (LD16), and `product16` loads the fragments with ldmatrix: four per k-step of a
// warp's 2 x 4 mma tiles, no conversions in the loop. `product` reads float32 tiles As[k][m],
// Bs[k][n] (tf32, and the reference layout), one conversion per fragment element.
//
// The instructions are seven small functions; the CPU emulator of the tests (tests/backends/
// test_cuda_conv.py, which defines CNNC_EMULATOR) supplies its own, written from the same ISA
// tables, and runs these kernels unchanged.
#ifndef CNNC_TENSOR_TILE_CUH
#define CNNC_TENSOR_TILE_CUH

#ifndef CNNC_EMULATOR
__device__ __forceinline__ unsigned cnnc_tf32(float v) {
    unsigned u;
    asm("cvt.rn.tf32.f32 %0, %1;" : "=r"(u) : "f"(v));
    return u;
}
// cvt.rn.{bf16,f16}x2.f32 d, a, b puts a in the upper half and b in the lower
__device__ __forceinline__ unsigned cnnc_pack_bf16(float lo, float hi) {
    unsigned u;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(u) : "f"(hi), "f"(lo));
    return u;
}
__device__ __forceinline__ unsigned cnnc_pack_f16(float lo, float hi) {
    unsigned u;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(u) : "f"(hi), "f"(lo));
    return u;
}
__device__ __forceinline__ void cnnc_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// the four 8 x 8 matrices of 16-bit elements whose rows lanes 0-7, 8-15, 16-23, 24-31 address
// (16 bytes each): r[i] of lane l holds row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix i
__device__ __forceinline__ void cnnc_ldmatrix_x4(unsigned (&r)[4], const unsigned short* row) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ float cnnc_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
template <bool BF16>
__device__ __forceinline__ void cnnc_mma_16bit(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    if constexpr (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// v rounded to PREC and back to float32: what the tensor cores multiply (round.cu's element-wise
// rounding, for the matmuls that do not run on them)
template <int PREC>
__device__ __forceinline__ float cnnc_round(float v) {
    if constexpr (PREC == 1) return __uint_as_float(cnnc_tf32(v) & 0xFFFFE000u);  // tf32: float32's top 19 bits
    else if constexpr (PREC == 2) return __uint_as_float(cnnc_pack_bf16(0.f, v) & 0xFFFF0000u);  // bf16: the top 16
    else return cnnc_f16_to_f32((unsigned short)(cnnc_pack_f16(v, 0.f) & 0xFFFFu));
}

template <int PREC, int BK, int AP, int BP, int WARPS_N>
struct CnncTensorTile {
    static constexpr int MI = 2;  // mma tiles of 16 rows per warp
    static constexpr int NI = 4;  // mma tiles of 8 columns per warp
    static constexpr int KSTEP = PREC == 1 ? 8 : 16;
    static_assert(PREC >= 1 && PREC <= 3, "PREC: 1 tf32, 2 bf16, 3 fp16");
    static_assert(BK % KSTEP == 0, "BLOCK_K: whole mma k-steps (8 for tf32, 16 for bf16 and fp16)");

    float acc[MI][NI][4];
    int wm, wn, gid, tig;

    __device__ __forceinline__ explicit CnncTensorTile(int tid) {
        const int warp = tid / 32, lane = tid % 32;
        wm = warp / WARPS_N;
        wn = warp % WARPS_N;
        gid = lane / 4;
        tig = lane % 4;
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;
    }

    __device__ __forceinline__ int row(int i, int c) const { return wm * 32 + i * 16 + gid + (c >= 2 ? 8 : 0); }
    __device__ __forceinline__ int col(int j, int c) const { return wn * 32 + j * 8 + tig * 2 + (c & 1); }

    // f(m, n, value) for each of the lane's accumulators, (m, n) offset by the block's (m0, n0)
    template <class F>
    __device__ __forceinline__ void each(int m0, int n0, F&& f) const {
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) f(m0 + row(i, c), n0 + col(j, c), acc[i][j][c]);
    }

    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        if constexpr (PREC == 2) return cnnc_pack_bf16(lo, hi);
        else return cnnc_pack_f16(lo, hi);
    }

    // ---- 16-bit shared tiles (PREC 2, 3): as[m][k], bs[n][k], the operands rounded once as they
    // are stored (bits16), rows of BK elements plus 16 bytes so that the eight 16-byte rows an
    // ldmatrix reads fall in different banks; fragments come four 8 x 8 matrices per ldmatrix
    static constexpr int LD16 = BK + 8;

    static __device__ __forceinline__ unsigned short bits16(float v) {
        return (unsigned short)(pack(v, 0.f) & 0xFFFFu);
    }

    __device__ __forceinline__ void product16(const unsigned short (*as)[LD16], const unsigned short (*bs)[LD16]) {
        static_assert(PREC == 2 || PREC == 3, "16-bit tiles: bf16 or fp16");
        const int lane = gid * 4 + tig;
        const int r8 = lane % 8, q1 = (lane / 8) % 2, q2 = lane / 16;
#pragma unroll
        for (int k0 = 0; k0 < BK; k0 += KSTEP) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i)  // matrices: rows 0-7 / 8-15 (q1) x k 0-7 / 8-15 (q2) = a0..a3
                cnnc_ldmatrix_x4(a[i], &as[wm * 32 + i * 16 + r8 + 8 * q1][k0 + 8 * q2]);
#pragma unroll
            for (int j = 0; j < NI; j += 2) {  // n 0-7 / 8-15 (q2) x k 0-7 / 8-15 (q1): b0, b1 of tiles j, j + 1
                unsigned r[4];
                cnnc_ldmatrix_x4(r, &bs[wn * 32 + j * 8 + r8 + 8 * q2][k0 + 8 * q1]);
                b[j][0] = r[0];
                b[j][1] = r[1];
                b[j + 1][0] = r[2];
                b[j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) cnnc_mma_16bit<PREC == 2>(acc[i][j], a[i], b[j]);
        }
    }

    // one pair of shared tiles: BK / KSTEP mma k-steps of the warp's MI x NI tiles
    __device__ __forceinline__ void product(const float (*as)[AP], const float (*bs)[BP]) {
#pragma unroll
        for (int k0 = 0; k0 < BK; k0 += KSTEP) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                const int m = wm * 32 + i * 16 + gid;
                if constexpr (PREC == 1) {
                    a[i][0] = cnnc_tf32(as[k0 + tig][m]);
                    a[i][1] = cnnc_tf32(as[k0 + tig][m + 8]);
                    a[i][2] = cnnc_tf32(as[k0 + tig + 4][m]);
                    a[i][3] = cnnc_tf32(as[k0 + tig + 4][m + 8]);
                } else {
                    const int k = k0 + 2 * tig;
                    a[i][0] = pack(as[k][m], as[k + 1][m]);
                    a[i][1] = pack(as[k][m + 8], as[k + 1][m + 8]);
                    a[i][2] = pack(as[k + 8][m], as[k + 9][m]);
                    a[i][3] = pack(as[k + 8][m + 8], as[k + 9][m + 8]);
                }
            }
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const int n = wn * 32 + j * 8 + gid;
                if constexpr (PREC == 1) {
                    b[j][0] = cnnc_tf32(bs[k0 + tig][n]);
                    b[j][1] = cnnc_tf32(bs[k0 + tig + 4][n]);
                } else {
                    const int k = k0 + 2 * tig;
                    b[j][0] = pack(bs[k][n], bs[k + 1][n]);
                    b[j][1] = pack(bs[k + 8][n], bs[k + 9][n]);
                }
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) {
                    if constexpr (PREC == 1) cnnc_mma_tf32(acc[i][j], a[i], b[j]);
                    else cnnc_mma_16bit<PREC == 2>(acc[i][j], a[i], b[j]);
                }
        }
    }
};

#endif  // CNNC_TENSOR_TILE_CUH
