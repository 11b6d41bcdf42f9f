// gemm_tile.cuh: the register-tile inner loop shared by the implicit-GEMM conv kernels
// (conv_fwd.cu, conv_bwd_data.cu, conv_bwd_filter.cu), included once per translation unit at
// file scope (source.py) and instantiated by each spec with its tile constants.
//
// One shared-memory tile: BLOCK_K rank-1 updates of a thread's THREAD_M x THREAD_N accumulators.
// as[k][m] and bs[k][n] are the block's tiles (rows padded to APAD / BPAD floats); the thread's
// rows are m = (i/4 * TM_T + tm) * 4 + i%4, its columns n = (j/4 * TN_T + tn) * 4 + j%4, read as
// float4s so that neighbouring threads read neighbouring float4s (no bank conflicts).
#ifndef CNNC_GEMM_TILE_CUH
#define CNNC_GEMM_TILE_CUH

template <int BK, int TM, int TN, int TMT, int TNT, int AP, int BP>
__device__ __forceinline__ void cnnc_mma_tile(const float (*as)[AP], const float (*bs)[BP], int tm, int tn,
                                              float (&acc)[TM][TN]) {
    static_assert(TM % 4 == 0 && TN % 4 == 0, "register tiles are read as float4s");
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM / 4; ++i) {
            const float4 t = *reinterpret_cast<const float4*>(&as[kk][(i * TMT + tm) * 4]);
            a[4 * i] = t.x;
            a[4 * i + 1] = t.y;
            a[4 * i + 2] = t.z;
            a[4 * i + 3] = t.w;
        }
#pragma unroll
        for (int j = 0; j < TN / 4; ++j) {
            const float4 t = *reinterpret_cast<const float4*>(&bs[kk][(j * TNT + tn) * 4]);
            b[4 * j] = t.x;
            b[4 * j + 1] = t.y;
            b[4 * j + 2] = t.z;
            b[4 * j + 3] = t.w;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
}

// A thread's ROWS x COLS loaded B-tile values (br[i * COLS + j] at reduction row brow0 + i * RSTEP,
// column bcol0 + j * NT) into shared memory: float32 bs[k][n], or (HALF) 16-bit bs[n][k] through
// cvt, the layout of the bf16 / fp16 tensor-core tiles (tensor_tile.cuh). Used by the backward
// kernels, whose B tiles share this mapping.
template <bool HALF, int ROWS, int COLS, int RSTEP, int NT, class T, int LD, class Cvt>
__device__ __forceinline__ void cnnc_store_b(T (*bs)[LD], const float* br, int brow0, int bcol0, Cvt cvt) {
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
#pragma unroll
        for (int j = 0; j < COLS; ++j) {
            if constexpr (HALF) bs[bcol0 + j * NT][brow0 + i * RSTEP] = cvt(br[i * COLS + j]);
            else bs[brow0 + i * RSTEP][bcol0 + j * NT] = br[i * COLS + j];
        }
}

#endif  // CNNC_GEMM_TILE_CUH
