// Batched 2-D transpose through shared memory: src (N, ROWS, COLS) → dst (N, COLS, ROWS), row-major.
// NCHW → NHWC is ROWS = C, COLS = H·W; NHWC → NCHW is ROWS = H·W, COLS = C.
//
// Defines: ROWS, COLS.
// Entry: transpose(src, dst); block (32, 8), grid (ceil(COLS/32), ceil(ROWS/32), N).
// A block moves one 32×32 tile: reads rows of src (coalesced along COLS), writes rows of dst
// (coalesced along ROWS); the tile's extra column keeps the column reads free of bank conflicts.

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;

extern "C" __global__ void __launch_bounds__(kTile * kRowsPerPass) KERNEL(transpose)(const float* __restrict__ src,
                                                                                   float* __restrict__ dst) {
    __shared__ float tile[kTile][kTile + 1];
    const long long plane = (long long)ROWS * COLS;
    src += blockIdx.z * plane;
    dst += blockIdx.z * plane;
    const int r0 = blockIdx.y * kTile, c0 = blockIdx.x * kTile;
    const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
    for (int k = ty; k < kTile; k += kRowsPerPass) {
        const int r = r0 + k, c = c0 + tx;
        if (r < ROWS && c < COLS) tile[k][tx] = src[(long long)r * COLS + c];
    }
    __syncthreads();
#pragma unroll
    for (int k = ty; k < kTile; k += kRowsPerPass) {
        const int c = c0 + k, r = r0 + tx;  // dst row c, column r
        if (c < COLS && r < ROWS) dst[(long long)c * ROWS + r] = tile[tx][k];
    }
}
