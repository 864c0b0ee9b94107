// CPU kernels for x86-64 with AVX2, FMA and F16C (int8 tiles use AVX-512 VNNI in the build for CPUs
// that have it, see vnni512.h): linear layers y[M, N] = x[M, K] @ W[N, K]^T, and attention.
//
// Weight formats (all row-major over N; per-block fp16 scales padded to `nbp`, a multiple of 8, with
// zeros):
//   F32   w  [N/4, K/8, 4, 8] float32, groups of 4 rows interleaved by 8 columns (see tile_f32)
//   Q8_0  qs [N, nb, 32] int8,   d [N, nbp] fp16:            value = d * q
//   Q4_1  qs [N, nb, 16] nibbles, d, m [N, nbp] fp16:        value = d * q + m   (byte j of a block holds
//         element j in its low nibble and element j + 16 in its high nibble, exactly as GGUF stores it)
//   Q4_K, Q5_K, Q6_K, Q5_0  qs [N, row bytes]: the GGUF file's blocks byte for byte (see kquant.h)
// Activations: float32, or int8 blocks of 32 quantized per row (round to nearest, scale = absmax / 127).
//
// Row invariance: output y[i, n] is computed by exactly the same sequence of floating-point operations
// whatever M is, whichever tile it falls in and whichever thread computes it: tiles only decide which
// outputs are computed side by side, never the order of a reduction. Threads split N, never K
// (see pool.h).
// This file must be compiled with -ffp-contract=off so the compiler never fuses a multiply and an add
// in one tile shape and not in another.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "abi.h"
#include "pool.h"

// Tile loops over rows and columns must be fully unrolled so accumulator arrays live in registers.
#define LD_UNROLL _Pragma("GCC unroll 16")

// The hints of the software prefetches of quantized weight streams (prefetch_rows, kq_prefetch) and of
// float32 ones (prefetch_f32); build.py chooses them per CPU vendor (hint_flags).
#ifndef Q_HINT
#define Q_HINT _MM_HINT_T1
#endif
#ifndef F32_HINT
#define F32_HINT _MM_HINT_T1
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define LD_VNNI512 1
#else
#define LD_VNNI512 0
#endif

#if LD_VNNI512 && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define LD_AMX 1
#else
#define LD_AMX 0
#endif

namespace {

constexpr int QK = 32;

enum Format {  // (abi.h)
    F32 = LD_FMT_F32,
    Q8_0 = LD_FMT_Q8_0,
    Q4_1 = LD_FMT_Q4_1,
    Q4_K = LD_FMT_Q4_K,
    Q5_K = LD_FMT_Q5_K,
    Q6_K = LD_FMT_Q6_K,
    Q5_0 = LD_FMT_Q5_0,
};
enum Act { ACT_F32 = LD_ACT_F32, ACT_INT8 = LD_ACT_INT8 };

inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float f16(uint16_t h) { return _cvtsh_ss(h); }

// ------------------------------------------------------------------ activations -> int8 blocks

struct QAct {
    const int8_t* q;   // [M, K]
    const float* d;    // [M, nbp] block scales (zero padded)
    const float* s;    // [M, nbp] d * sum(q) per block (zero padded), for the min terms of Q4_1, Q4_K, Q5_K
    const int16_t* xs;  // [M, 2 * nbp] sum(q) per 16 (zero padded), for the offsets of Q6_K and Q5_0
    int64_t K, nbp;
};

// How quantize_row stores a row's int8 values: in element order, or grouped for a format's tiles.
enum ActLayout { ELEMENTS, GROUPED_Q4_1, GROUPED_K };

// GROUPED_Q4_1: the layout the AVX-512 Q4_1 tiles read. Each run of 4 whole blocks is stored as the
// first halves (elements 0-15) of the 4 blocks, then their second halves, matching the low and high
// nibbles of 64 bytes of Q4_1 weights. Blocks after the last full run of 4 stay in element order.
// GROUPED_K: the AVX-512 Q4_K and Q5_K tiles' layout: the blocks of each 256 in the order 0, 2, 1, 3, 4,
// 6, 5, 7 (the sub-blocks in the low and high nibbles of 64 weight bytes). `xs`: sums per 16, or null.
void quantize_row(const float* x, int64_t nb, int8_t* q, float* d, float* s, int16_t* xs, ActLayout layout) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < nb; ++b) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        LD_UNROLL for (int j = 0; j < 4; ++j) {
            v[j] = _mm256_loadu_ps(x + b * QK + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float dv = _mm_cvtss_f32(m4) / 127.0f;
        const __m256 id = _mm256_set1_ps(dv != 0.0f ? 1.0f / dv : 0.0f);
        __m256i i[4];
        LD_UNROLL for (int j = 0; j < 4; ++j)
            i[j] = _mm256_cvtps_epi32(
                _mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        p = _mm256_permutevar8x32_epi32(p, perm);  // the 32 values in element order
        if (layout == GROUPED_Q4_1 && b < nb / 4 * 4) {
            int8_t* g = q + (b / 4) * 4 * QK + (b % 4) * 16;
            _mm_storeu_si128((__m128i*)g, _mm256_castsi256_si128(p));
            _mm_storeu_si128((__m128i*)(g + 64), _mm256_extracti128_si256(p, 1));
        } else if (layout == GROUPED_K) {  // (nb is a multiple of 8)
            const int64_t j = b % 8, slot = (j & 4) | (j & 1) << 1 | (j & 2) >> 1;
            _mm256_storeu_si256((__m256i*)(q + (b - j + slot) * QK), p);
        } else {
            _mm256_storeu_si256((__m256i*)(q + b * QK), p);
        }
        d[b] = dv;
        s[b] = dv * (float)_mm_cvtsi128_si32(s4);
        if (xs) {  // lane 0: elements 0-15, lane 1: 16-31
            const __m256i h = _mm256_hadd_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            const __m256i h2 = _mm256_hadd_epi32(h, h);
            const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h2), _mm256_extracti128_si256(h2, 1));
            xs[2 * b] = (int16_t)_mm_cvtsi128_si32(t);
            xs[2 * b + 1] = (int16_t)_mm_extract_epi32(t, 1);
        }
    }
}

// ------------------------------------------------------------------ tiles
// Each tile computes y[m0:m0+MR, n0:n0+NR]; `w*` point at row n0, `x*` at row m0.

struct WQ {
    const uint8_t* qs;
    const uint16_t* d;
    const uint16_t* m;
    const float* f;
    int64_t K, nb, nbp;
    int64_t row_bytes;  // the GGUF block formats of kquant.h: bytes per row
};

// Block scales b..b+7 of rows n0..n0+NR-1 as float32 (the fp16 -> fp32 conversion is exact).
template <int NR>
inline void load_scales(const WQ& w, int64_t n0, int64_t b, float (*ds)[8]) {
    LD_UNROLL for (int n = 0; n < NR; ++n)
        _mm256_store_ps(ds[n], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w.d + (n0 + n) * w.nbp + b))));
}

// Q4_1's min term per output: sum over blocks of m_w * (d_x * sum(q_x)), 8 blocks per step. Loops over
// (n, m) stay innermost so every array here is indexed by constants (kept in registers).
template <int NR, int MR>
inline void min_terms(const WQ& w, int64_t n0, const QAct& a, int64_t m0, __m256 (&am)[NR][MR]) {
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m) am[n][m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < w.nbp; g += 8)
        LD_UNROLL for (int n = 0; n < NR; ++n) {
            const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w.m + (n0 + n) * w.nbp + g)));
            LD_UNROLL for (int m = 0; m < MR; ++m)
                am[n][m] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(a.s + (m0 + m) * w.nbp + g), am[n][m]);
        }
}

#if LD_VNNI512
#include "vnni512.h"
#else
template <int NR, int MR>
void tile_q41_q8(const WQ& w, int64_t n0, const QAct& a, int64_t m0, float* y, int64_t ldy) {
    const int64_t nb = w.nb, nbp = w.nbp;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NR][MR];
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m) acc[n][m] = _mm256_setzero_ps();
    alignas(32) float ds[NR][8];
    for (int64_t b = 0; b < nb; ++b) {
        if (b % 8 == 0) load_scales<NR>(w, n0, b, ds);
        __m256i wq[NR];
        __m256 wd[NR];
        LD_UNROLL for (int n = 0; n < NR; ++n) {
            const __m128i raw = _mm_loadu_si128((const __m128i*)(w.qs + ((n0 + n) * nb + b) * 16));
            wq[n] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
            wd[n] = _mm256_broadcast_ss(&ds[n][b % 8]);
        }
        LD_UNROLL for (int m = 0; m < MR; ++m) {
            const __m256i xq = _mm256_loadu_si256((const __m256i*)(a.q + (m0 + m) * a.K + b * QK));
            const __m256 xd = _mm256_broadcast_ss(a.d + (m0 + m) * nbp + b);
            LD_UNROLL for (int n = 0; n < NR; ++n) {
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq[n], xq), ones);
                const __m256 pf = _mm256_mul_ps(_mm256_cvtepi32_ps(p), xd);
                acc[n][m] = _mm256_fmadd_ps(pf, wd[n], acc[n][m]);
            }
        }
    }
    __m256 am[NR][MR];  // sum over blocks of min * d_x * sum(q_x)
    min_terms<NR, MR>(w, n0, a, m0, am);
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m) y[(m0 + m) * ldy + n0 + n] = hsum8(_mm256_add_ps(acc[n][m], am[n][m]));
}

template <int NR, int MR>
void tile_q80_q8(const WQ& w, int64_t n0, const QAct& a, int64_t m0, float* y, int64_t ldy) {
    const int64_t nb = w.nb, nbp = w.nbp;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NR][MR];
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m) acc[n][m] = _mm256_setzero_ps();
    alignas(32) float ds[NR][8];
    for (int64_t b = 0; b < nb; ++b) {
        if (b % 8 == 0) load_scales<NR>(w, n0, b, ds);
        __m256i wq[NR], wa[NR];
        __m256 wd[NR];
        LD_UNROLL for (int n = 0; n < NR; ++n) {
            wq[n] = _mm256_loadu_si256((const __m256i*)(w.qs + ((n0 + n) * nb + b) * QK));
            wa[n] = _mm256_sign_epi8(wq[n], wq[n]);  // |w| as unsigned bytes (also for -128)
            wd[n] = _mm256_broadcast_ss(&ds[n][b % 8]);
        }
        LD_UNROLL for (int m = 0; m < MR; ++m) {
            const __m256i xq = _mm256_loadu_si256((const __m256i*)(a.q + (m0 + m) * a.K + b * QK));
            const __m256 xd = _mm256_broadcast_ss(a.d + (m0 + m) * nbp + b);
            LD_UNROLL for (int n = 0; n < NR; ++n) {
                const __m256i xs = _mm256_sign_epi8(xq, wq[n]);  // sign of w moved onto x
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[n], xs), ones);
                const __m256 pf = _mm256_mul_ps(_mm256_cvtepi32_ps(p), xd);
                acc[n][m] = _mm256_fmadd_ps(pf, wd[n], acc[n][m]);
            }
        }
    }
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m) y[(m0 + m) * ldy + n0 + n] = hsum8(acc[n][m]);
}

#endif  // LD_VNNI512

// Float activations with quantized weights: each block is dequantized exactly as GGUF does
// (d * q + m, d * q), then multiplied with float32 activations.
template <int NR, int MR, bool Q4>
void tile_q_f32(const WQ& w, int64_t n0, const float* x, int64_t ldx, int64_t m0, float* y, int64_t ldy) {
    const int64_t nb = w.nb, nbp = w.nbp;
    const __m256i low = _mm256_set1_epi32(0x0F);
    __m256 acc[NR][MR];
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m) acc[n][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        __m256 wd[NR], wm[NR];
        LD_UNROLL for (int n = 0; n < NR; ++n) {
            wd[n] = _mm256_set1_ps(f16(w.d[(n0 + n) * nbp + b]));
            wm[n] = Q4 ? _mm256_set1_ps(f16(w.m[(n0 + n) * nbp + b])) : _mm256_setzero_ps();
        }
        LD_UNROLL for (int j = 0; j < 4; ++j) {
            LD_UNROLL for (int n = 0; n < NR; ++n) {
                __m256 wv;
                if (Q4) {
                    const uint8_t* p = w.qs + ((n0 + n) * nb + b) * 16 + (j & 1) * 8;
                    __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
                    q = j < 2 ? _mm256_and_si256(q, low) : _mm256_srli_epi32(q, 4);
                    wv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), wd[n], wm[n]);  // d*q is exact: one rounding
                } else {
                    const uint8_t* p = w.qs + ((n0 + n) * nb + b) * QK + j * 8;
                    const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
                    wv = _mm256_mul_ps(_mm256_cvtepi32_ps(q), wd[n]);
                }
                LD_UNROLL for (int m = 0; m < MR; ++m)
                    acc[n][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (m0 + m) * ldx + b * QK + j * 8), acc[n][m]);
            }
        }
    }
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m) y[(m0 + m) * ldy + n0 + n] = hsum8(acc[n][m]);
}

inline __m256i tail_mask(int64_t r) {  // first r lanes set, r in [0, 8)
    const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i*)(lanes + 8 - r));
}

// F32 weights are interleaved (quant.pack_f32): group g of 4 rows holds, for each run of 8 columns, those
// 8 columns of its rows 0..3 in turn, zero padded to whole groups and runs; n0 is always a multiple of 4.
// The padding of the last run is read as zeros against masked-off (zero) activations, as before.
// Software prefetch ahead of the stream. One row: 2 KB, measured 3-5% more bandwidth than the hardware
// prefetcher alone over the model's 121 layers (paired runs, 2 threads). Several rows: each 128 bytes
// take more arithmetic, so the stream must be requested further ahead to keep memory busy meanwhile:
// 6 KB measured best (7 rows of a 1.5B model's layers: 1.46x one row's time instead of 1.81x at 2 KB).
// Non-temporal hint: a weight line is used once per pass, so it should not push the activations, the
// cached keys and values and the interpreter's own data out of L2. Measured against _MM_HINT_T0, one
// process, builds alternated per generation: one-token steps of the bundled float32 model 0.94x the time
// with the host streaming ~45-50 GB/s, 0.95-0.98x at ~75 GB/s; the 1.5B float32 model 0.96-0.98x.
template <int MR>
constexpr int64_t f32_ahead() { return MR == 1 ? 512 : 1536; }  // floats

inline void prefetch_f32(const float* p) {  // the two lines one 8-column step of a group reads
    _mm_prefetch((const char*)p, F32_HINT);
    _mm_prefetch((const char*)(p + 16), F32_HINT);
}

// Each register holds one row's 8-column run; a lane sums every 8th product of its row.
template <int NR, int MR>
void tile_f32_256(const WQ& w, int64_t n0, const float* x, int64_t ldx, int64_t m0, float* y, int64_t ldy) {
    const int64_t K = w.K, K8 = K & ~int64_t(7), Kp = (K + 7) & ~int64_t(7);
    const float* g = w.f + (n0 / 4) * 4 * Kp;  // this tile's group
    __m256 acc[NR][MR];
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m) acc[n][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
        prefetch_f32(g + 4 * k + f32_ahead<MR>());
        LD_UNROLL for (int n = 0; n < NR; ++n) {
            const __m256 wv = _mm256_loadu_ps(g + 4 * k + 8 * n);
            LD_UNROLL for (int m = 0; m < MR; ++m)
                acc[n][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (m0 + m) * ldx + k), acc[n][m]);
        }
    }
    if (K8 < K) {
        const __m256i mask = tail_mask(K - K8);
        LD_UNROLL for (int n = 0; n < NR; ++n) {
            const __m256 wv = _mm256_loadu_ps(g + 4 * K8 + 8 * n);
            LD_UNROLL for (int m = 0; m < MR; ++m)
                acc[n][m] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + (m0 + m) * ldx + K8, mask), acc[n][m]);
        }
    }
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m) y[(m0 + m) * ldy + n0 + n] = hsum8(acc[n][m]);
}

#if LD_VNNI512
// One 512-bit register holds two rows' 8-column runs (they lie side by side in a group) against the 8
// activations broadcast to both halves. Each lane accumulates exactly what a lane of the 256-bit tile
// does, so outputs are bit-identical to it (and to the AVX2 build), with half the multiply-adds: 7 rows
// of arithmetic on 2 cores then keep up with the memory stream.
//
// A tile covers up to 8 weight rows (two groups) and columns [k0, k1) of one block (`ColBlock`); between
// blocks the accumulators are saved and reloaded unchanged, so blocking never changes a lane's sums.
// Up to 8 rows of x (a step): 4 weight rows, all columns in one block. Many rows (prefill): 8 weight
// rows against up to 6 rows of x (24 accumulators) over blocks of KC columns, so a block of weights
// (8 x 2 KB) and the x rows it meets stay in L1 while every row of x in the pass reuses them. Measured
// on all linears of a 1.5B model (700 rows, 2 threads): 1.31x the speed of 4-row tiles over whole rows
// (about 410 against 310 GFLOP/s).
constexpr int64_t KC = 512;
constexpr int WIDE_NR = 8, WIDE_MR = 6;  // the many-rows tile: weight rows x rows of x

struct ColBlock {
    int64_t k0, k1;  // columns [k0, k1) of the whole-8 part of K
    __m512* saved;   // [MR][4] accumulators of rows m0.. between blocks
    bool first, last;
};

template <int NR, int MR>
void tile_f32_wide(const WQ& w, int64_t n0, const float* x, int64_t ldx, int64_t m0, const ColBlock& c, float* y,
                   int64_t ldy) {
    constexpr int NP = (NR + 1) / 2;  // pair p: rows 2p, 2p + 1, in group p / 2
    const int64_t K = w.K, K8 = K & ~int64_t(7), Kp = (K + 7) & ~int64_t(7);
    const float* g = w.f + (n0 / 4) * 4 * Kp;  // the first of the tile's two groups
    __m512 acc[NP][MR];
    LD_UNROLL for (int p = 0; p < NP; ++p)
        LD_UNROLL for (int m = 0; m < MR; ++m) acc[p][m] = c.first ? _mm512_setzero_ps() : c.saved[m * 4 + p];
    auto step = [&](int64_t k, auto load_x) {
        __m512 wv[NP];
        LD_UNROLL for (int p = 0; p < NP; ++p) wv[p] = _mm512_loadu_ps(g + (p / 2) * 4 * Kp + 4 * k + 16 * (p % 2));
        LD_UNROLL for (int m = 0; m < MR; ++m) {
            const __m512 xv = _mm512_broadcast_f32x8(load_x(x + (m0 + m) * ldx + k));  // [x, x]
            LD_UNROLL for (int p = 0; p < NP; ++p) acc[p][m] = _mm512_fmadd_ps(wv[p], xv, acc[p][m]);
        }
    };
    for (int64_t k = c.k0; k < c.k1; k += 8) {
        prefetch_f32(g + 4 * k + f32_ahead<MR>());
        if (NR > 4) prefetch_f32(g + 4 * Kp + 4 * k + f32_ahead<MR>());
        step(k, [](const float* p) { return _mm256_loadu_ps(p); });
    }
    if (!c.last) {
        LD_UNROLL for (int p = 0; p < NP; ++p)
            LD_UNROLL for (int m = 0; m < MR; ++m) c.saved[m * 4 + p] = acc[p][m];
        return;
    }
    if (K8 < K) {
        const __m256i mask = tail_mask(K - K8);
        step(K8, [mask](const float* p) { return _mm256_maskload_ps(p, mask); });
    }
    LD_UNROLL for (int p = 0; p < NP; ++p)
        LD_UNROLL for (int m = 0; m < MR; ++m) {
            y[(m0 + m) * ldy + n0 + 2 * p] = hsum8(_mm512_castps512_ps256(acc[p][m]));
            if (2 * p + 1 < NR) y[(m0 + m) * ldy + n0 + 2 * p + 1] = hsum8(_mm512_extractf32x8_ps(acc[p][m], 1));
        }
}

using WideFn = void (*)(const WQ&, int64_t, const float*, int64_t, int64_t, const ColBlock&, float*, int64_t);
#define LD_WROW(N) {tile_f32_wide<N, 1>, tile_f32_wide<N, 2>, tile_f32_wide<N, 3>, \
                    tile_f32_wide<N, 4>, tile_f32_wide<N, 5>, tile_f32_wide<N, 6>}
const WideFn T_F32_WIDE[WIDE_NR][WIDE_MR] = {LD_WROW(1), LD_WROW(2), LD_WROW(3), LD_WROW(4),
                                 LD_WROW(5), LD_WROW(6), LD_WROW(7), LD_WROW(8)};
#endif

// One row stays on 256 bits with AVX-512 too: it is bound by memory, and measured 4% faster that way.
template <int NR, int MR>
void tile_f32(const WQ& w, int64_t n0, const float* x, int64_t ldx, int64_t m0, float* y, int64_t ldy) {
#if LD_VNNI512
    if constexpr (MR > 1) {
        tile_f32_wide<NR, MR>(w, n0, x, ldx, m0, ColBlock{0, w.K & ~int64_t(7), nullptr, true, true}, y, ldy);
        return;
    }
#endif
    tile_f32_256<NR, MR>(w, n0, x, ldx, m0, y, ldy);
}

// ------------------------------------------------------------------ tile tables and the driver

struct Inputs {
    const float* x;
    int64_t ldx;
    QAct a;
};

using TileFn = void (*)(const WQ&, int64_t, const Inputs&, int64_t, float*, int64_t);

template <int NR, int MR>
void run_q41_q8(const WQ& w, int64_t n0, const Inputs& in, int64_t m0, float* y, int64_t ldy) {
    tile_q41_q8<NR, MR>(w, n0, in.a, m0, y, ldy);
}
template <int NR, int MR>
void run_q80_q8(const WQ& w, int64_t n0, const Inputs& in, int64_t m0, float* y, int64_t ldy) {
    tile_q80_q8<NR, MR>(w, n0, in.a, m0, y, ldy);
}
template <int NR, int MR>
void run_q41_f32(const WQ& w, int64_t n0, const Inputs& in, int64_t m0, float* y, int64_t ldy) {
    tile_q_f32<NR, MR, true>(w, n0, in.x, in.ldx, m0, y, ldy);
}
template <int NR, int MR>
void run_q80_f32(const WQ& w, int64_t n0, const Inputs& in, int64_t m0, float* y, int64_t ldy) {
    tile_q_f32<NR, MR, false>(w, n0, in.x, in.ldx, m0, y, ldy);
}
template <int NR, int MR>
void run_f32(const WQ& w, int64_t n0, const Inputs& in, int64_t m0, float* y, int64_t ldy) {
    tile_f32<NR, MR>(w, n0, in.x, in.ldx, m0, y, ldy);
}

constexpr int MAXN = 4, MAXM = 8;  // tables hold every tile shape up to 4 x 8

#define LD_ROW(FN, N) {FN<N, 1>, FN<N, 2>, FN<N, 3>, FN<N, 4>, FN<N, 5>, FN<N, 6>, FN<N, 7>, FN<N, 8>}
#define LD_TABLE(FN) {LD_ROW(FN, 1), LD_ROW(FN, 2), LD_ROW(FN, 3), LD_ROW(FN, 4)}
#define LD_ROW4(FN, N) {FN<N, 1>, FN<N, 2>, FN<N, 3>, FN<N, 4>, nullptr, nullptr, nullptr, nullptr}
#define LD_TABLE4(FN) {LD_ROW4(FN, 1), LD_ROW4(FN, 2), LD_ROW4(FN, 3), LD_ROW4(FN, 4)}

const TileFn T_Q41_Q8[MAXN][MAXM] = LD_TABLE(run_q41_q8);
const TileFn T_Q80_Q8[MAXN][MAXM] = LD_TABLE(run_q80_q8);
const TileFn T_Q41_F32[MAXN][MAXM] = LD_TABLE4(run_q41_f32);
const TileFn T_Q80_F32[MAXN][MAXM] = LD_TABLE4(run_q80_f32);
const TileFn T_F32[MAXN][MAXM] = LD_TABLE(run_f32);

#include "kquant.h"

struct Plan {
    const TileFn (*table)[MAXM];  // nullptr: float32 wide tiles (run_range_wide) or AMX tiles (amx >= 0)
    int nr, mr;  // the full tile shape (mr <= 4 for tables built with LD_TABLE4, else <= 8)
    int amx = -1;  // AMX build: kq_index of a K-quant format run through the tile unit (amx.h)
};

// Rows of x from which the AMX build runs K-quant weights through the tile unit; with fewer, the VNNI
// tiles (same bits) cost less: the tile path's unpacking of 16 weight rows and its tile loads and stores
// are paid once for up to 8 rows (benchmarks/kernel_speed.py --layer, BENCHMARKS.md).
inline int64_t amx_min_rows(int fmt) { return fmt == Q6_K ? 6 : 5; }

Plan plan_for(int fmt, int act, int64_t M) {
    // The shape is a speed choice only: any shape gives bit-identical outputs.
#if LD_VNNI512
    if (fmt == F32 && M > 8) return {nullptr, WIDE_NR, WIDE_MR};  // the wide tiles (run_range_wide)
#endif
    if (fmt == F32) {  // balanced row tiles of at most 8 rows (16 of AVX-512's 32 registers), 3 with AVX2
        const int64_t most = LD_VNNI512 ? 8 : 3, tiles = (M + most - 1) / most;
        return {T_F32, 4, (int)((M + tiles - 1) / tiles)};
    }
    if (LD_AMX && is_kquant(fmt) && act == ACT_INT8 && M >= amx_min_rows(fmt)) return {nullptr, 16, 16, kq_index(fmt)};
    if (is_kquant(fmt)) {  // one weight row against up to 8 (float32: 4) rows of x
        if (act == ACT_INT8) return {T_KQ_Q8[kq_index(fmt)], 1, M >= 8 ? 8 : (int)M};
        return {T_KQ_F32[kq_index(fmt)], 1, M >= 4 ? 4 : (int)M};
    }
    if (act == ACT_INT8) {
        if (LD_VNNI512 && M > 4 && (M <= 8 || fmt == Q8_0))  // one pass over the weights for M <= 8
            return {fmt == Q4_1 ? T_Q41_Q8 : T_Q80_Q8, 2, M >= 8 ? 8 : (int)M};
        // One token: one-row tiles, so a thread's chunk is read as one sequential stream (a 4-row tile reads
        // 4 rows side by side). Measured on all linears of a model, one process: 0.5B Qwen int4 0.79x the
        // time of 4-row tiles, int8 0.79x; the bundled model's own blocks 0.92x, int8 0.86x (AVX-512);
        // AVX2 build 0.73x / 0.89x. The extra activation loads cost less than the prefetcher gains.
        if (M == 1) return {fmt == Q4_1 ? T_Q41_Q8 : T_Q80_Q8, 1, 1};
        if (LD_VNNI512) return {fmt == Q4_1 ? T_Q41_Q8 : T_Q80_Q8, 4, M >= 4 ? 4 : (int)M};
        return {fmt == Q4_1 ? T_Q41_Q8 : T_Q80_Q8, 2, M >= 4 ? 4 : (int)M};
    }
    if (M == 1) return {fmt == Q4_1 ? T_Q41_F32 : T_Q80_F32, 4, 1};
    return {fmt == Q4_1 ? T_Q41_F32 : T_Q80_F32, 2, M >= 4 ? 4 : (int)M};
}

constexpr int64_t MB = 64;  // rows of x per pass over a weight tile (keeps x in cache for long prompts)

#if LD_VNNI512
// Rows [n_begin, n_end) of a float32 weight against M > 8 rows of x with the wide tiles: for each 8 rows
// of weights and each column block, every row of x in the pass (MB of them) meets the block in turn.
void run_range_wide(const WQ& w, const float* x, int64_t ldx, int64_t M, int64_t n_begin, int64_t n_end, float* y,
                    int64_t ldy) {
    alignas(64) __m512 saved[MB * 4];
    const int64_t tiles = (M + WIDE_MR - 1) / WIDE_MR, mr_full = (M + tiles - 1) / tiles;  // balanced
    const int64_t K8 = w.K & ~int64_t(7), blocks = K8 > KC ? (K8 + KC - 1) / KC : 1;
    for (int64_t mb = 0; mb < M; mb += MB) {
        const int64_t me = mb + MB < M ? mb + MB : M;
        for (int64_t n0 = n_begin; n0 < n_end; n0 += WIDE_NR) {
            const int nr = n_end - n0 < WIDE_NR ? (int)(n_end - n0) : WIDE_NR;
            for (int64_t b = 0; b < blocks; ++b) {
                const int64_t k0 = b * KC, k1 = k0 + KC < K8 ? k0 + KC : K8;
                for (int64_t m0 = mb; m0 < me; m0 += mr_full) {
                    const int mr = me - m0 < mr_full ? (int)(me - m0) : (int)mr_full;
                    const ColBlock c{k0, k1, saved + (m0 - mb) * 4, b == 0, b == blocks - 1};
                    T_F32_WIDE[nr - 1][mr - 1](w, n0, x, ldx, m0, c, y, ldy);
                }
            }
        }
    }
}
#endif

void run_range(const Plan& p, const WQ& w, const Inputs& in, int64_t M, int64_t n_begin, int64_t n_end,
               float* y, int64_t ldy) {
    for (int64_t mb = 0; mb < M; mb += MB) {
        const int64_t me = mb + MB < M ? mb + MB : M;
        for (int64_t n0 = n_begin; n0 < n_end; n0 += p.nr) {
            const int nr = n_end - n0 < p.nr ? (int)(n_end - n0) : p.nr;
            for (int64_t m0 = mb; m0 < me; m0 += p.mr) {
                const int mr = me - m0 < p.mr ? (int)(me - m0) : p.mr;
                p.table[nr - 1][mr - 1](w, n0, in, m0, y, ldy);
            }
        }
    }
}

#if LD_AMX
#include "amx.h"
#endif
#include "attention.h"

// ------------------------------------------------------------------ parallel drivers

struct QuantJob {
    const float* x;
    int64_t ldx, M, K, nb, nbp, rows;
    int8_t* q;
    float *d, *s;
    int16_t* xs;
    ActLayout layout;
};

void quant_chunk(void* ctx, int64_t c, int) {
    const QuantJob& j = *(const QuantJob*)ctx;
    const int64_t e = (c + 1) * j.rows < j.M ? (c + 1) * j.rows : j.M;
    for (int64_t i = c * j.rows; i < e; ++i) {
        int16_t* xs = j.xs ? j.xs + i * 2 * j.nbp : nullptr;
        quantize_row(j.x + i * j.ldx, j.nb, j.q + i * j.K, j.d + i * j.nbp, j.s + i * j.nbp, xs, j.layout);
        for (int64_t b = j.nb; b < j.nbp; ++b) j.d[i * j.nbp + b] = j.s[i * j.nbp + b] = 0.0f;
        if (xs) memset(xs + 2 * j.nb, 0, (size_t)(j.nbp - j.nb) * 2 * sizeof(int16_t));
    }
}

struct LinearJob {
    Plan p;
    WQ w;
    Inputs in;
    int64_t M, N, rows;
    float* y;
    int64_t ldy;
    const int8_t* xv;  // AMX plans: x's int8 rows in the tile unit's layout (amx_pack_act)
};

void linear_chunk(void* ctx, int64_t c, int) {
    const LinearJob& j = *(const LinearJob*)ctx;
    const int64_t e = (c + 1) * j.rows < j.N ? (c + 1) * j.rows : j.N;
#if LD_AMX
    if (j.p.amx >= 0) return T_KQ_AMX[j.p.amx](j.w, j.in, j.xv, j.M, c * j.rows, e, j.y, j.ldy);
#endif
#if LD_VNNI512
    if (j.p.table == nullptr) return run_range_wide(j.w, j.in.x, j.in.ldx, j.M, c * j.rows, e, j.y, j.ldy);
#endif
    run_range(j.p, j.w, j.in, j.M, c * j.rows, e, j.y, j.ldy);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void quantize_act(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t nbp, int8_t* q, float* d, float* s,
                  int16_t* xs, int threads, ActLayout layout) {
    QuantJob j{x, ldx, M, K, K / QK, nbp, 16, q, d, s, xs, layout};
    ld::Pool::get().run(ceil_div(M, j.rows), quant_chunk, &j, M * K >= (1 << 16) ? threads : 1);
}

inline int64_t padded_blocks(int64_t K) { return (K / QK + 7) / 8 * 8; }

// Bytes of scratch a linear with int8 activations needs for M rows of K inputs: d and s (float), the
// sums per 16 (int16), then q (and in the AMX build, 64-byte aligned, q in the tile unit's layout).
inline size_t act_scratch_bytes(int64_t M, int64_t K) {
    const size_t base = (size_t)(M * K + 2 * M * padded_blocks(K) * (int64_t)(sizeof(float) + sizeof(int16_t)));
#if LD_AMX
    return base + 64 + amx_act_bytes(M, K);
#else
    return base;
#endif
}

LdStatus check_linear(int fmt, int act, int64_t K) {
    if (fmt < F32 || fmt > Q5_0 || act < ACT_F32 || act > ACT_INT8) return LD_ERR_FORMAT;
    if (fmt != F32 && (K % QK != 0)) return LD_ERR_BLOCK_K;
    if ((fmt == Q4_K || fmt == Q5_K || fmt == Q6_K) && K % QKK != 0) return LD_ERR_SUPER_BLOCK_K;
    if (fmt == F32 && act != ACT_F32) return LD_ERR_F32_ACT;
    return LD_OK;
}

// y = x @ W^T for checked arguments; `scratch` holds act_scratch_bytes(M, K) for int8 activations.
void linear(int fmt, int act, int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const void* qs,
            const uint16_t* d, const uint16_t* m, const float* f, float* y, int64_t ldy, int threads,
            void* scratch) {
    const int64_t nb = K / QK, nbp = padded_blocks(K);
    const Plan p = plan_for(fmt, act, M);
    const int64_t row_bytes = is_kquant(fmt) ? kq_row_bytes(fmt, K) : 0;
    LinearJob j{p,
                WQ{(const uint8_t*)qs, d, m, f, K, nb, nbp, row_bytes},
                Inputs{x, ldx, {nullptr, nullptr, nullptr, nullptr, K, nbp}},
                M,
                N,
                0,
                y,
                ldy,
                nullptr};
    if (act == ACT_INT8) {
        float* dx = (float*)scratch;
        float* sx = dx + M * nbp;
        int16_t* xs = (int16_t*)(sx + M * nbp);
        int8_t* qx = (int8_t*)(xs + M * 2 * nbp);
        const ActLayout layout = LD_VNNI512 && fmt == Q4_1 ? GROUPED_Q4_1 : k_grouped(fmt) ? GROUPED_K : ELEMENTS;
        const bool sums16 = fmt == Q6_K || fmt == Q5_0;
        quantize_act(x, ldx, M, K, nbp, qx, dx, sx, sums16 ? xs : nullptr, threads, layout);
        j.in.a = QAct{qx, dx, sx, xs, K, nbp};
#if LD_AMX
        if (p.amx >= 0) {
            int8_t* xv = (int8_t*)(((uintptr_t)(qx + M * K) + 63) & ~(uintptr_t)63);
            amx_pack_act(fmt, j.in.a, M, K, xv);
            j.xv = xv;
        }
#endif
    }
    const int nt = M * N * K < (1 << 17) ? 1 : threads;
    // Two chunks per thread, so a thread that loses its core leaves part of its share to the others. More
    // would cost: weights stream from memory and each chunk starts a new stream (2 per thread measured
    // 3-8% faster than 8 for float32 over the model's layers, 10-20% for the quantized formats).
    const int64_t per_thread = 2;
    j.rows = ceil_div(ceil_div(N, per_thread * (int64_t)nt), p.nr) * p.nr;
    ld::Pool::get().run(ceil_div(N, j.rows), linear_chunk, &j, nt);
}

}  // namespace

extern "C" {

int ld_isa() { return LD_AMX ? 1024 : LD_VNNI512 ? 512 : 256; }  // which build this is

// Quantize rows of x to int8 blocks in element order: q [M, K], d and s [M, nbp] (padding set to zero).
void ld_quantize_act(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t nbp, int8_t* q, float* d,
                     float* s, int threads) {
    quantize_act(x, ldx, M, K, nbp, q, d, s, nullptr, threads, ELEMENTS);
}

// y[i, n] (row stride ldy) = sum_k x[i, k] W[n, k].  Returns LD_OK, or the LdStatus of bad arguments.
LdStatus ld_linear(int fmt, int act, int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx,
              const void* qs, const uint16_t* d, const uint16_t* m, const float* f, float* y, int64_t ldy,
              int threads) {
    if (M <= 0 || N <= 0 || K <= 0) return M == 0 ? LD_OK : LD_ERR_EMPTY;
    if (const LdStatus rc = check_linear(fmt, act, K)) return rc;
    void* scratch = act == ACT_INT8 ? malloc(act_scratch_bytes(M, K)) : nullptr;
    if (act == ACT_INT8 && !scratch) return LD_ERR_NO_MEMORY;
    linear(fmt, act, M, N, K, x, ldx, qs, d, m, f, y, ldy, threads, scratch);
    free(scratch);
    return LD_OK;
}

// Returns LD_OK, or the LdStatus of bad arguments.
LdStatus ld_attention(const float* q, const float* k, const float* v, float* out, int64_t B, int64_t H, int64_t Hkv,
                 int64_t S, int64_t T, int64_t D, const int64_t* qst, const int64_t* kst, const int64_t* vst,
                 const int64_t* ost, const uint8_t* mask, int64_t mask_stride, float scale, int threads) {
    if (const LdStatus rc = check_attention(H, Hkv, D)) return rc;
    if (B * H * S == 0) return LD_OK;
    const AttnArgs a{q, k, v, out, B, H, Hkv, S, T, D, qst, kst, vst, ost, mask, mask_stride, scale};
    const int nt = attention_threads(a, threads);
    void* scratch = malloc(attention_scratch_bytes(T, H / Hkv, nt));
    const LdStatus rc = scratch ? attention(a, nt, scratch) : LD_ERR_NO_MEMORY;
    free(scratch);
    return rc;
}

}  // extern "C"

#include "stack.h"
