// tandem's CUDA kernels, compiled at run time with NVRTC (kernels/src/cuda.rs).
//
// Matmuls keep the activations in f32 (as the CPU's exact path does) and read each weight row
// once for all m <= 8 activation rows: m = 1 is decode, m = 2..9 a verification pass.
//
// Layout (cuda.rs repacks GGML blocks at upload): a quantized matrix [n, k] is its quants, row
// after row (Q8_0: k int8 per row; Q4_0: k / 2 bytes per row, each 32-weight block's 16 bytes
// in GGML's order), followed by its scales, one f16 per 32 weights, row after row. So each lane
// reads 16-byte words: a decode step is a stream of wide loads, not byte loads at a 34- or
// 18-byte stride (which reached 5% of the read bandwidth on an H200).
//
// One warp computes OUT_ROWS output rows (F16_OUT_ROWS for F16), so each activation load from
// L1 serves that many weight words; lanes stride over 16-byte chunks of the rows, then reduce.
// Each kernel is compiled for its row count m (MATMUL_KERNELS below). The products of an
// output (j, r) are summed in an order that depends neither on m nor on the activations'
// alignment, so a row of a verification pass equals the same row decoded alone, bit for bit.
// (Measured on an H200, BENCHMARKS.md "Session 39".)

#define MAX_ROWS 8
#define OUT_ROWS 2
#define F16_OUT_ROWS 4

__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// The sum over the warp, in every lane.
__device__ __forceinline__ float warp_sum_all(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Four signed bytes to floats without the (slow) integer-to-float conversion: byte b ^ 0x80
// placed in the mantissa of 2^23 is the float 2^23 + 128 + b, exactly.
__device__ __forceinline__ void s8x4_to_f32(unsigned int v, float* f) {
    unsigned int u = v ^ 0x80808080u;
    f[0] = __int_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - 8388736.0f;
    f[1] = __int_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - 8388736.0f;
    f[2] = __int_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - 8388736.0f;
    f[3] = __int_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - 8388736.0f;
}

// Four nibbles (one per byte, 0..15) to q - 8 as floats, the same way.
__device__ __forceinline__ void u4x4_to_f32(unsigned int v, float* f) {
    f[0] = __int_as_float(__byte_perm(v, 0x4B000000u, 0x7540)) - 8388616.0f;
    f[1] = __int_as_float(__byte_perm(v, 0x4B000000u, 0x7541)) - 8388616.0f;
    f[2] = __int_as_float(__byte_perm(v, 0x4B000000u, 0x7542)) - 8388616.0f;
    f[3] = __int_as_float(__byte_perm(v, 0x4B000000u, 0x7543)) - 8388616.0f;
}

// x[0..16] into registers: 16-byte loads where `wide` (x 16-byte aligned), else one float at a
// time; one branch for all 16, so the loads issue together.
__device__ __forceinline__ void load_x16(const float* __restrict__ x, int wide, float4* a) {
    if (wide) {
#pragma unroll
        for (int q = 0; q < 4; q++) a[q] = __ldg((const float4*)x + q);
    } else {
#pragma unroll
        for (int q = 0; q < 4; q++)
            a[q] = make_float4(__ldg(x + 4 * q), __ldg(x + 4 * q + 1), __ldg(x + 4 * q + 2),
                               __ldg(x + 4 * q + 3));
    }
}

// sum_{i<16} w[i] * x[i] in one fixed order.
__device__ __forceinline__ float dot16(const float* w, const float4* a) {
    float s = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; q++)
        s += w[4 * q] * a[q].x + w[4 * q + 1] * a[q].y + w[4 * q + 2] * a[q].z +
             w[4 * q + 3] * a[q].w;
    return s;
}

template <int J>
__device__ __forceinline__ void finish_rows(float (*acc)[MAX_ROWS], float* out, int m, int n,
                                            int j0) {
#pragma unroll
    for (int jj = 0; jj < J; jj++) {
#pragma unroll
        for (int r = 0; r < MAX_ROWS; r++) {
            if (r < m) {
                float s = warp_sum(acc[jj][r]);
                if (threadIdx.x == 0 && j0 + jj < n) out[r * n + j0 + jj] = s;
            }
        }
    }
}

// The first of the J output rows of this warp; rows past n are computed from row n - 1 and
// not stored.
template <int J>
__device__ __forceinline__ int first_row() {
    return (blockIdx.x * blockDim.y + threadIdx.y) * J;
}

// A 16-byte weight word, loaded as streaming (evict-first) data: the weights are read once per
// pass, and L1 is left to the activations, which every warp of the block reads again.
__device__ __forceinline__ uint4 load_weights(const uint4* p) { return __ldcs(p); }

// Where the quants (`q`) and the scales (`d`) of this warp's OUT_ROWS output rows start, in
// the layout above; `row_bytes` is a row's quant bytes.
__device__ __forceinline__ void quant_rows(const unsigned char* __restrict__ w, int k, int n,
                                           int j0, int row_bytes, const uint4** q,
                                           const unsigned short** d) {
    const unsigned short* scales = (const unsigned short*)(w + (size_t)n * row_bytes);
#pragma unroll
    for (int jj = 0; jj < OUT_ROWS; jj++) {
        int j = min(j0 + jj, n - 1);
        q[jj] = (const uint4*)(w + (size_t)j * row_bytes);
        d[jj] = scales + (size_t)j * (k / 32);
    }
}

// out[r*n + j] = sum_p x[r*k + p] * W[j, p]; W in Q8_0 (see the layout above), k % 32 == 0;
// `wide`: x is 16-byte aligned (cuda.rs checks).
template <int M>
__device__ __forceinline__ void matmul_q8_0_rows(const unsigned char* __restrict__ w,
                                                 const float* __restrict__ x,
                                                 float* __restrict__ out,
                                                 int k,
                                                 int n,
                                                 int wide) {
    const int m = M;
    int j0 = first_row<OUT_ROWS>();
    if (j0 >= n) return;
    int chunks = k / 16;
    const uint4* q[OUT_ROWS];
    const unsigned short* d[OUT_ROWS];
    quant_rows(w, k, n, j0, k, q, d);
    float acc[OUT_ROWS][MAX_ROWS] = {};
    for (int c = threadIdx.x; c < chunks; c += 32) {
        float wf[OUT_ROWS][16];
        float scale[OUT_ROWS];
#pragma unroll
        for (int jj = 0; jj < OUT_ROWS; jj++) {
            uint4 v = load_weights(q[jj] + c);
            scale[jj] = half_bits_to_float(__ldg(d[jj] + (c >> 1)));
            s8x4_to_f32(v.x, wf[jj]);
            s8x4_to_f32(v.y, wf[jj] + 4);
            s8x4_to_f32(v.z, wf[jj] + 8);
            s8x4_to_f32(v.w, wf[jj] + 12);
        }
#pragma unroll
        for (int r = 0; r < MAX_ROWS; r++) {
            if (r < m) {
                float4 xv[4];
                load_x16(x + (size_t)r * k + c * 16, wide, xv);
#pragma unroll
                for (int jj = 0; jj < OUT_ROWS; jj++) acc[jj][r] += scale[jj] * dot16(wf[jj], xv);
            }
        }
    }
    finish_rows<OUT_ROWS>(acc, out, m, n, j0);
}

// Q4_0 (see the layout above): a block's weight i < 16 is the low nibble of its byte i, weight
// 16 + i the high nibble; value d * (q - 8). One lane takes one whole block (16 bytes).
template <int M>
__device__ __forceinline__ void matmul_q4_0_rows(const unsigned char* __restrict__ w,
                                                 const float* __restrict__ x,
                                                 float* __restrict__ out,
                                                 int k,
                                                 int n,
                                                 int wide) {
    const int m = M;
    int j0 = first_row<OUT_ROWS>();
    if (j0 >= n) return;
    int nb = k / 32;
    const uint4* q[OUT_ROWS];
    const unsigned short* d[OUT_ROWS];
    quant_rows(w, k, n, j0, k / 2, q, d);
    float acc[OUT_ROWS][MAX_ROWS] = {};
    for (int b = threadIdx.x; b < nb; b += 32) {
        uint4 v[OUT_ROWS];
        float scale[OUT_ROWS];
#pragma unroll
        for (int jj = 0; jj < OUT_ROWS; jj++) {
            v[jj] = load_weights(q[jj] + b);
            scale[jj] = half_bits_to_float(__ldg(d[jj] + b));
        }
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float wf[OUT_ROWS][16];
#pragma unroll
            for (int jj = 0; jj < OUT_ROWS; jj++) {
                unsigned int sh = 4 * half;
                u4x4_to_f32((v[jj].x >> sh) & 0x0F0F0F0Fu, wf[jj]);
                u4x4_to_f32((v[jj].y >> sh) & 0x0F0F0F0Fu, wf[jj] + 4);
                u4x4_to_f32((v[jj].z >> sh) & 0x0F0F0F0Fu, wf[jj] + 8);
                u4x4_to_f32((v[jj].w >> sh) & 0x0F0F0F0Fu, wf[jj] + 12);
            }
#pragma unroll
            for (int r = 0; r < MAX_ROWS; r++) {
                if (r < m) {
                    float4 xv[4];
                    load_x16(x + (size_t)r * k + b * 32 + 16 * half, wide, xv);
#pragma unroll
                    for (int jj = 0; jj < OUT_ROWS; jj++)
                        acc[jj][r] += scale[jj] * dot16(wf[jj], xv);
                }
            }
        }
    }
    finish_rows<OUT_ROWS>(acc, out, m, n, j0);
}

// Dense F16 weights [n, k]. Where k % 8 == 0 lanes take 8 weights (16 bytes) at a time, and
// the activations with 16-byte loads where `wide` (x 16-byte aligned, cuda.rs checks) or
// one float at a time where not: the same sums in the same order either way.
template <int M>
__device__ __forceinline__ void matmul_f16_rows(const unsigned short* __restrict__ w,
                                                const float* __restrict__ x,
                                                float* __restrict__ out,
                                                int k,
                                                int n,
                                                int wide) {
    const int m = M;
    const int J = F16_OUT_ROWS;
    int j0 = first_row<J>();
    if (j0 >= n) return;
    const unsigned short* row[J];
#pragma unroll
    for (int jj = 0; jj < J; jj++) row[jj] = w + (size_t)min(j0 + jj, n - 1) * k;
    float acc[J][MAX_ROWS] = {};
    if ((k & 7) == 0) {
#pragma unroll 2
        for (int c = threadIdx.x; c < k / 8; c += 32) {
            float wf[J][8];
#pragma unroll
            for (int jj = 0; jj < J; jj++) {
                uint4 v = load_weights((const uint4*)row[jj] + c);
                unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    wf[jj][2 * e] = half_bits_to_float((unsigned short)(u[e] & 0xffffu));
                    wf[jj][2 * e + 1] = half_bits_to_float((unsigned short)(u[e] >> 16));
                }
            }
#pragma unroll
            for (int r = 0; r < MAX_ROWS; r++) {
                if (r < m) {
                    const float* xr = x + (size_t)r * k + c * 8;
                    float4 a, b;
                    if (wide) {
                        a = __ldg((const float4*)xr);
                        b = __ldg((const float4*)xr + 1);
                    } else {
                        a = make_float4(__ldg(xr), __ldg(xr + 1), __ldg(xr + 2), __ldg(xr + 3));
                        b = make_float4(__ldg(xr + 4), __ldg(xr + 5), __ldg(xr + 6),
                                        __ldg(xr + 7));
                    }
#pragma unroll
                    for (int jj = 0; jj < J; jj++) {
                        const float* f = wf[jj];
                        acc[jj][r] += f[0] * a.x + f[1] * a.y + f[2] * a.z + f[3] * a.w +
                                      f[4] * b.x + f[5] * b.y + f[6] * b.z + f[7] * b.w;
                    }
                }
            }
        }
    } else {
        for (int p = threadIdx.x; p < k; p += 32) {
#pragma unroll
            for (int jj = 0; jj < J; jj++) {
                float wv = half_bits_to_float(row[jj][p]);
#pragma unroll
                for (int r = 0; r < MAX_ROWS; r++) {
                    if (r < m) acc[jj][r] += wv * x[(size_t)r * k + p];
                }
            }
        }
    }
    finish_rows<J>(acc, out, m, n, j0);
}

// One kernel per row count m = 1..MAX_ROWS, so that each is compiled for its own m: the row
// loops unroll without predicates and a decode step's kernel holds one row's registers, not
// eight (occupancy). `m` is in the argument list only to keep one launch signature.
#define MATMUL_KERNELS(M)                                                                     \
    extern "C" __global__ void matmul_q8_0_##M(const unsigned char* __restrict__ w,           \
                                               const float* __restrict__ x,                   \
                                               float* __restrict__ out, int m, int k, int n,  \
                                               int wide) {                                    \
        matmul_q8_0_rows<M>(w, x, out, k, n, wide);                                          \
    }                                                                                         \
    extern "C" __global__ void matmul_q4_0_##M(const unsigned char* __restrict__ w,           \
                                               const float* __restrict__ x,                   \
                                               float* __restrict__ out, int m, int k, int n,  \
                                               int wide) {                                    \
        matmul_q4_0_rows<M>(w, x, out, k, n, wide);                                          \
    }                                                                                         \
    extern "C" __global__ void matmul_f16_##M(const unsigned short* __restrict__ w,           \
                                              const float* __restrict__ x,                    \
                                              float* __restrict__ out, int m, int k, int n,   \
                                              int wide) {                                     \
        matmul_f16_rows<M>(w, x, out, k, n, wide);                                           \
    }
MATMUL_KERNELS(1)
MATMUL_KERNELS(2)
MATMUL_KERNELS(3)
MATMUL_KERNELS(4)
MATMUL_KERNELS(5)
MATMUL_KERNELS(6)
MATMUL_KERNELS(7)
MATMUL_KERNELS(8)

// Reads `words` 16-byte words and writes one sum per thread: the read-bandwidth probe the
// kernels' GB/s are compared with.
extern "C" __global__ void read_probe(const uint4* __restrict__ src, unsigned long long words,
                                      unsigned int* __restrict__ sink) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned int s = 0;
    for (; i < words; i += stride) {
        uint4 v = src[i];
        s ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (s == 0x9e3779b9u) sink[0] = s; // never true in practice; keeps the loads alive
}

// ---- The rest of the forward pass, so activations and the KV cache stay on the GPU ----
// Each mirrors a CPU function (kernels/src/ops.rs, kernels/src/attention.rs), which is its
// reference in kernels/tests/gpu.rs.

// Sum over a block of up to 1024 threads; every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    v = warp_sum(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? part[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) part[0] = v;
    __syncthreads();
    float total = part[0];
    __syncthreads();
    return total;
}

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w; one block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, int d, float eps) {
    const float* xr = x + (size_t)blockIdx.x * d;
    float* o = out + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    float inv = rsqrtf(block_sum(ss) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}

// x[r, :] += res[r, :], then out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w: a
// residual add and the norm after it in one launch, with add_assign's and rms_norm's sums (the
// same bits as the two launches). One block per row.
extern "C" __global__ void add_rms_norm(float* __restrict__ x, const float* __restrict__ res,
                                        const float* __restrict__ w, float* __restrict__ out,
                                        int d, float eps) {
    float* xr = x + (size_t)blockIdx.x * d;
    const float* rr = res + (size_t)blockIdx.x * d;
    float* o = out + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = xr[i] + rr[i];
        xr[i] = v;
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}

// Rotate-half RoPE in place on q [rows, hq, hd] and k [rows, hk, hd] (the queries and keys of
// a pass, in one launch; hk = 0 rotates q alone); row r is at position pos[r], and cos/sin
// are the pass's tables [positions, hd/2]. One block per row.
extern "C" __global__ void rope_rotate_half(float* __restrict__ q, float* __restrict__ k,
                                            const int* __restrict__ pos,
                                            const float* __restrict__ cos_t,
                                            const float* __restrict__ sin_t, int hq, int hk,
                                            int hd) {
    int half = hd / 2;
    int r = blockIdx.x;
    const float* c = cos_t + (size_t)pos[r] * half;
    const float* s = sin_t + (size_t)pos[r] * half;
    for (int e = threadIdx.x; e < (hq + hk) * half; e += blockDim.x) {
        int h = e / half, i = e % half;
        float* xh = h < hq ? q + ((size_t)r * hq + h) * hd : k + ((size_t)r * hk + h - hq) * hd;
        float a = xh[i], b = xh[i + half];
        xh[i] = a * c[i] - b * s[i];
        xh[i + half] = b * c[i] + a * s[i];
    }
}

// A sequence's cache, as the attention kernels find it on the GPU: the buffer's address is
// ptrs[slot], and info[2 * seq], info[2 * seq + 1] are its length before the pass (n) and its
// capacity (cap). Read on the GPU, so that a pass captured into a CUDA graph replays with
// each step's length and with any cache of the same shape (cuda.rs writes them per pass).
struct KvAt {
    float* cache;
    int n, cap;
};
__device__ __forceinline__ KvAt kv_at(const unsigned long long* __restrict__ ptrs, int slot,
                                      const int* __restrict__ info, int seq) {
    KvAt a;
    a.cache = (float*)ptrs[slot];
    a.n = info[2 * seq];
    a.cap = info[2 * seq + 1];
    return a;
}

// Writes t rows of new keys and of new values, k_src and v_src [t, nkv, hd], into their
// caches [nkv, cap, hd] (ptrs[k_slot], ptrs[v_slot]; n, cap: kv_at) at positions n..n+t. One
// block per (keys or values, row, kv head).
extern "C" __global__ void kv_append(const float* __restrict__ k_src,
                                     const float* __restrict__ v_src,
                                     const unsigned long long* __restrict__ ptrs, int k_slot,
                                     int v_slot, const int* __restrict__ info, int seq, int nkv,
                                     int hd) {
    int per = gridDim.x / 2;
    bool values = blockIdx.x >= per;
    int block = values ? blockIdx.x - per : blockIdx.x;
    const float* src = values ? v_src : k_src;
    KvAt at = kv_at(ptrs, values ? v_slot : k_slot, info, seq);
    float* cache = at.cache;
    int n = at.n, cap = at.cap;
    int i = block / nkv, h = block % nkv;
    const float* s = src + ((size_t)i * nkv + h) * hd;
    float* d = cache + ((size_t)h * cap + n + i) * hd;
    for (int c = threadIdx.x; c < hd; c += blockDim.x) d[c] = s[c];
}

#define MAX_HD_PER_LANE 8 // head_dim <= 256
#define ATT_WARPS 8        // warps per (query row, head); ATTENTION_THREADS in cuda.rs

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Causal attention of t new queries q [t, nh, hd] over caches [nkv, cap, hd] (keys at
// ptrs[k_slot], values at ptrs[v_slot]; n, cap: kv_at) that hold n + t positions (the new
// ones included). One block of ATT_WARPS warps per (head, query row). Warp w takes the
// positions in tiles of 32, tiles w, w + ATT_WARPS, ...: each lane scores one position of a
// tile (a whole dot product), the warp keeps a running max and sum (online softmax) and
// accumulates the values with lanes over the head dimension; then the warps' partial results
// are merged. The split depends only on the row's own length, so a row's result does not
// depend on how many rows share the pass.
//
// (Session 41's first GPU run found the one-warp-per-row kernel, a warp reduction per
// position, to be most of a SmolLM2 decode step at a few hundred positions.)
extern "C" __global__ void attention(const float* __restrict__ q,
                                     const unsigned long long* __restrict__ ptrs, int k_slot,
                                     int v_slot, const int* __restrict__ info, int seq,
                                     float* __restrict__ out, int nh, int nkv, int hd,
                                     float scale) {
    __shared__ __align__(16) float qs[32 * MAX_HD_PER_LANE];
    __shared__ float part_m[ATT_WARPS], part_l[ATT_WARPS];
    __shared__ float part_acc[ATT_WARPS][32 * MAX_HD_PER_LANE];
    KvAt ka = kv_at(ptrs, k_slot, info, seq), va = kv_at(ptrs, v_slot, info, seq);
    int n = ka.n, cap = ka.cap;
    int h = blockIdx.x, i = blockIdx.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int kv = h / (nh / nkv);
    const float* qr = q + ((size_t)i * nh + h) * hd;
    const float* kb = ka.cache + (size_t)kv * cap * hd;
    const float* vb = va.cache + (size_t)kv * cap * hd;
    for (int c = threadIdx.x; c < hd; c += blockDim.x) qs[c] = qr[c];
    __syncthreads();
    const float neg_inf = __int_as_float(0xff800000);
    float m = neg_inf, l = 0.0f;
    float acc[MAX_HD_PER_LANE];
#pragma unroll
    for (int s = 0; s < MAX_HD_PER_LANE; s++) acc[s] = 0.0f;
    int len = n + i + 1;
    bool vec = (hd & 3) == 0;
    for (int base = warp * 32; base < len; base += ATT_WARPS * 32) {
        int p = base + lane;
        float sc = neg_inf;
        if (p < len) {
            const float* kr = kb + (size_t)p * hd;
            float dot = 0.0f;
            if (vec) {
                for (int c = 0; c < hd; c += 4) {
                    float4 k4 = *(const float4*)(kr + c);
                    float4 q4 = *(const float4*)(qs + c);
                    dot += q4.x * k4.x + q4.y * k4.y + q4.z * k4.z + q4.w * k4.w;
                }
            } else {
                for (int c = 0; c < hd; c++) dot += qs[c] * kr[c];
            }
            sc = dot * scale;
        }
        // Lane 0's position is always in the row (base < len), so the tile's max is finite.
        float mn = fmaxf(m, warp_max(sc));
        float corr = expf(m - mn); // 0 on the first tile (m = -inf)
        float e = (p < len) ? expf(sc - mn) : 0.0f;
        l = l * corr + warp_sum_all(e);
#pragma unroll
        for (int s = 0; s < MAX_HD_PER_LANE; s++) acc[s] *= corr;
        int count = min(32, len - base);
        for (int j = 0; j < count; j++) {
            float ej = __shfl_sync(0xffffffffu, e, j);
            const float* vr = vb + (size_t)(base + j) * hd;
#pragma unroll
            for (int s = 0; s < MAX_HD_PER_LANE; s++) {
                int c = lane + 32 * s;
                if (c < hd) acc[s] += ej * vr[c];
            }
        }
        m = mn;
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int s = 0; s < MAX_HD_PER_LANE; s++) {
        int c = lane + 32 * s;
        if (c < hd) part_acc[warp][c] = acc[s];
    }
    __syncthreads();
    // Merge the warps' results in a fixed order (a warp with no tile has m = -inf, l = 0).
    float mm = neg_inf;
    for (int w = 0; w < ATT_WARPS; w++) mm = fmaxf(mm, part_m[w]);
    float* o = out + ((size_t)i * nh + h) * hd;
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float lsum = 0.0f, osum = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) {
            float f = part_m[w] == neg_inf ? 0.0f : expf(part_m[w] - mm);
            lsum += part_l[w] * f;
            osum += part_acc[w][c] * f;
        }
        o[c] = osum / lsum;
    }
}

// gate = silu(gate) * up, elementwise.
extern "C" __global__ void silu_mul(float* __restrict__ gate, const float* __restrict__ up,
                                    int len) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// acc[i] += b[i % period]: a residual add (period = len) or a bias per row (period = n).
extern "C" __global__ void add_assign(float* __restrict__ acc, const float* __restrict__ b,
                                      int len, int period) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) acc[i] += b[i % period];
}
