// Intel AMX int8 tiles for the K-quant formats (Q4_K, Q5_K, Q6_K) and Q5_0 with int8 activations, for
// several rows of x (verification and prefill). Included by native.cpp in the AMX build (after kquant.h).
//
// Row invariance: kquant.h reduces every format to exact int32 sums per sub-block (`isum`) followed by one
// fixed sequence of float32 operations per output (kq_step, then hsum8). Here the integer sums come from
// the tile unit and the float sequence is kq_step's, lane for lane: each lane of the one-row accumulator
// is a register here (16 weight rows side by side), and hsum8's additions are the same additions between
// those registers. Integer sums do not depend on how they are formed, and the float operations are the
// same operations on the same values in the same order, so every output has the bits of the one-row tile.
//
// Layout. A tile product C[r][n] += sum_k A[r][k] B[k/4][4n + k%4] takes A = a chunk of 8 rows of x, each
// twice: row h*8 + m holds row m's values on half h of the product's span and zeros on the other half
// (amx_pack_act, once per call), and B = 16 weight rows unpacked to a byte per weight, interleaved: B's
// row k/4 holds weights k..k+3 of each of the 16 rows. A product over 64 weights (Q6_K: 32) then leaves
// in C's row h*8 + m the sums of one sub-block (Q6_K: one group of 16) for x row m and 16 weight rows:
// one register, in which the 16 rows' scales of that sub-block are one register too (decoded for 16 rows
// at once) and x's scale is one broadcast value. The weights reach the interleaved layout by 16 x 16
// transposes of their packed dwords (nibbles and high bits are unpacked after the transpose, in place;
// Q5_0's 22-byte blocks are gathered a dword of 16 rows at a time).
// The OS must have granted this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM) before the
// library is used; the Python side asks once (build.py).
#pragma once

namespace {

constexpr int AMX_N = 16;  // weight rows per tile product: C's columns
constexpr int AMX_R = 8;   // rows of x per chunk; A's and C's rows are 2 x AMX_R

template <int F>
constexpr int amx_span() {  // weights per tile product: two sub-blocks (Q6_K: one, as two groups of 16)
    return F == Q6_K ? 32 : 64;
}
template <int F>
constexpr int amx_ops() {  // tile products per group of 256
    return QKK / amx_span<F>();
}

// Q6_K and Q5_0 weights go to the tile unit with their offset removed (q - 32, q - 16: signed bytes);
// Q4_K and Q5_K weights are unsigned.
template <int F>
constexpr bool amx_signed() {
    return F == Q6_K || F == Q5_0;
}

struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Tiles 0-3: C (16 x 16 int32); 4, 6: A (16 rows of x x span bytes); 5, 7: B (span / 4 rows x 64 bytes).
inline void amx_config(int span) {
    TileConfig c{};
    c.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        const bool b = t >= 4 && t % 2 == 1;
        c.rows[t] = (uint8_t)(b ? span / 4 : 2 * AMX_R);
        c.colsb[t] = (uint16_t)(t >= 4 && !b ? span : 64);
    }
    _tile_loadconfig(&c);
}

inline int64_t amx_groups(int64_t K) { return (K / QK + 7) / 8; }
inline int64_t amx_chunks(int64_t M) { return (M + AMX_R - 1) / AMX_R; }

// Bytes amx_pack_act writes for M rows of K: per chunk of 8 rows, 16 bytes per k (a group's A tiles).
inline size_t amx_act_bytes(int64_t M, int64_t K) { return (size_t)(amx_chunks(M) * 16 * amx_groups(K) * QKK); }

// Where element e of a row of x lies in quantize_row's layout for F (GROUPED_K moves whole blocks).
template <int F>
inline int64_t amx_x_pos(int64_t e) {
    if (!k_grouped(F)) return e;
    const int64_t j = e / QK % 8, slot = (j & 4) | (j & 1) << 1 | (j & 2) >> 1;
    return e + (slot - j) * QK;
}

// x's int8 rows (q [M, K]) as A tiles, for chunk c: product o's tile at out + o * 16 * span, its row
// h * 8 + m holding x[m][span o + span/2 h ...] on half h, zeros elsewhere and past K.
template <int F>
void amx_pack_values(const int8_t* q, int64_t M, int64_t K, int64_t c, int8_t* out) {
    constexpr int span = amx_span<F>(), half = span / 2;
    const int64_t ops = amx_groups(K) * amx_ops<F>();
    memset(out, 0, (size_t)(ops * 2 * AMX_R * span));
    for (int m = 0; m < AMX_R && c * AMX_R + m < M; ++m) {
        const int8_t* x = q + (c * AMX_R + m) * K;
        for (int64_t o = 0; o < ops; ++o)
            for (int h = 0; h < 2 && o * span + h * half < K; ++h)
                memcpy(out + (o * 2 * AMX_R + h * AMX_R + m) * span + h * half, x + amx_x_pos<F>(o * span + h * half),
                       half);
    }
}

template <int F>
void amx_pack(const QAct& a, int64_t M, int64_t K, int8_t* xv) {
    const int64_t per_chunk = 16 * amx_groups(K) * QKK;
    for (int64_t c = 0; c < amx_chunks(M); ++c) amx_pack_values<F>(a.q, M, K, c, xv + c * per_chunk);
}

void amx_pack_act(int fmt, const QAct& a, int64_t M, int64_t K, int8_t* xv) {
    if (fmt == Q4_K) return amx_pack<Q4_K>(a, M, K, xv);
    if (fmt == Q5_K) return amx_pack<Q5_K>(a, M, K, xv);
    if (fmt == Q6_K) return amx_pack<Q6_K>(a, M, K, xv);
    amx_pack<Q5_0>(a, M, K, xv);
}

// ------------------------------------------------------------------ the weight side of one group

// The weight side of one group for 16 rows: B tiles and, per sub-block, the 16 rows' scales.
struct AmxWeights {
    alignas(64) uint8_t wb[16 * QKK];  // product o's B tile at o * 16 * span
    __m512 wd[8];   // sub-block (Q5_0: block) j: d * sc[j], or d of block j (zero past the row's blocks)
    __m512 mw[8];   // Q4_K, Q5_K: -(dmin * m[j])
    __m512 sc[16];  // Q6_K: the scale of each group of 16, as float
    __m512 d;       // Q6_K
};

// Dword `off` (bytes from p) of each of 16 rows row_bytes apart.
inline __m512i amx_gather(const uint8_t* p, int64_t row_bytes, int64_t off) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)row_bytes));
    return _mm512_i32gather_epi32(idx, p + off, 1);
}

inline __m512 amx_f16_lo(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)); }  // low halves

// t[d] = lane d of each of r[0..15] (t[d] lane n = r[n] lane d).
inline void amx_transpose(__m512i* r) {
    __m512i a[16], b[16];
    LD_UNROLL for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    LD_UNROLL for (int i = 0; i < 16; i += 4) {  // b[i + e] lane L: rows i..i+3 of dword 4L + e
        b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
        b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
        b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
        b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    LD_UNROLL for (int e = 0; e < 4; ++e) {
        const __m512i c0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0x44), c1 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0xEE);
        const __m512i c2 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0x44);
        const __m512i c3 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0xEE);
        r[e] = _mm512_shuffle_i32x4(c0, c2, 0x88);
        r[4 + e] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
        r[8 + e] = _mm512_shuffle_i32x4(c1, c3, 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
    }
}

// t[d]: dword d of the 64 bytes at p of each of 16 rows.
inline void amx_load_t(const uint8_t* p, int64_t row_bytes, __m512i* t) {
    LD_UNROLL for (int n = 0; n < 16; ++n) t[n] = _mm512_loadu_si512(p + n * row_bytes);
    amx_transpose(t);
}

// Bit j of each byte (j < 8) moved to bit `to`, other bits of the byte anywhere but `to`.
inline __m512i amx_bit_to(__m512i v, int j, int to) {
    return j < to ? _mm512_slli_epi32(v, (unsigned)(to - j)) : j > to ? _mm512_srli_epi32(v, (unsigned)(j - to)) : v;
}

inline __m512i amx_nibble(__m512i v, int hi) {
    return _mm512_and_si512(hi ? _mm512_srli_epi32(v, 4) : v, _mm512_set1_epi8(0x0F));
}

template <int F>
void amx_scales(const uint8_t* p, int64_t rb, int valid, AmxWeights& out) {
    if constexpr (has_mins<F>()) {
        const __m512i g0 = amx_gather(p, rb, 0), u0 = amx_gather(p, rb, 4), u1 = amx_gather(p, rb, 8);
        const __m512i u2 = amx_gather(p, rb, 12), m6 = _mm512_set1_epi8(0x3F), m4 = _mm512_set1_epi8(0x0F);
        const __m512i m2 = _mm512_set1_epi8(0x30);
        const __m512i sc[2] = {_mm512_and_si512(u0, m6), _mm512_or_si512(_mm512_and_si512(u2, m4),
                                                                         _mm512_and_si512(_mm512_srli_epi32(u0, 2), m2))};
        const __m512i mn[2] = {_mm512_and_si512(u1, m6),
                               _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u2, 4), m4),
                                               _mm512_and_si512(_mm512_srli_epi32(u1, 2), m2))};
        const __m512 d = amx_f16_lo(g0), dmin = amx_f16_lo(_mm512_srli_epi32(g0, 16));
        const __m512i byte = _mm512_set1_epi32(0xFF);
        LD_UNROLL for (int j = 0; j < 8; ++j) {  // as kq_scales: exact products, sign flipped
            const unsigned sh = 8 * (j % 4);
            const __m512 s = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(sc[j / 4], sh), byte));
            const __m512 m = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(mn[j / 4], sh), byte));
            out.wd[j] = _mm512_mul_ps(s, d);
            out.mw[j] = _mm512_xor_ps(_mm512_mul_ps(m, dmin), _mm512_set1_ps(-0.0f));
        }
    } else if constexpr (F == Q6_K) {
        out.d = amx_f16_lo(_mm512_srli_epi32(amx_gather(p, rb, 206), 16));
        LD_UNROLL for (int g = 0; g < 4; ++g) {
            const __m512i v = amx_gather(p, rb, 192 + 4 * g);
            LD_UNROLL for (int t = 0; t < 4; ++t)
                out.sc[4 * g + t] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * t), 24));
        }
    } else {
        LD_UNROLL for (int j = 0; j < 8; ++j)
            out.wd[j] = j < valid ? amx_f16_lo(amx_gather(p, rb, 22 * j)) : _mm512_setzero_ps();
    }
}

// Q4_K, Q5_K: product i (sub-blocks 2i, 2i + 1) from the transposed nibbles t[8 (i % 2) + r]; Q5_K's fifth
// bits from qh (transposed: qh[r] holds bit j of elements 4r..4r+3 of sub-block j).
template <int F>
void amx_b_k(const __m512i* t, const __m512i* qh, int i, uint8_t* wb) {
    LD_UNROLL for (int h = 0; h < 2; ++h)
        LD_UNROLL for (int r = 0; r < 8; ++r) {
            __m512i v = amx_nibble(t[8 * (i % 2) + r], h);
            if constexpr (F == Q5_K)
                v = _mm512_or_si512(v, _mm512_and_si512(amx_bit_to(qh[r], 2 * i + h, 4), _mm512_set1_epi8(0x10)));
            _mm512_store_si512(wb + (i * 16 + h * 8 + r) * 64, v);
        }
}

// Q6_K: product j = 4h + i (sub-block j) from the transposed low bits tl (of half h) and high bits qh.
inline void amx_b_q6(const __m512i* tl, const __m512i* qh, int h, int i, uint8_t* wb) {
    LD_UNROLL for (int r = 0; r < 8; ++r) {
        const __m512i lo = amx_nibble(tl[8 * (i % 2) + r], i / 2);
        const __m512i hi = _mm512_and_si512(amx_bit_to(qh[8 * h + r], 2 * i, 4), _mm512_set1_epi8(0x30));
        _mm512_store_si512(wb + ((4 * h + i) * 8 + r) * 64, _mm512_sub_epi8(_mm512_or_si512(lo, hi), _mm512_set1_epi8(32)));
    }
}

// Q5_0: block j (half j % 2 of product j / 2) from its 16 rows' qs dwords and fifth bits (zeros past the
// row's blocks).
inline void amx_b_q5_0(const uint8_t* p, int64_t rb, int j, int valid, uint8_t* wb) {
    uint8_t* out = wb + ((j / 2) * 16 + (j % 2) * 8) * 64;
    if (j >= valid) return (void)memset(out, 0, 8 * 64);
    const __m512i qh = amx_gather(p, rb, 22 * j + 2);
    LD_UNROLL for (int r = 0; r < 8; ++r) {  // elements 4r..4r+3: bits 4r..4r+3 of qh to bit 4 of 4 bytes
        const __m512i qs = amx_gather(p, rb, 22 * j + 6 + 4 * (r % 4));
        const __m512i bits = _mm512_and_si512(_mm512_srli_epi32(qh, (unsigned)(4 * r)), _mm512_set1_epi32(0xF));
        const __m512i spread = _mm512_and_si512(_mm512_mullo_epi32(bits, _mm512_set1_epi32(0x00204081)),
                                                _mm512_set1_epi32(0x01010101));
        const __m512i v = _mm512_or_si512(amx_nibble(qs, r / 4), _mm512_slli_epi32(spread, 4));
        _mm512_store_si512(out + r * 64, _mm512_sub_epi8(v, _mm512_set1_epi8(16)));
    }
}

template <int F>
void amx_unpack(const WQ& w, int64_t n0, int64_t s, int valid, AmxWeights& out) {
    const int64_t rb = w.row_bytes;
    const uint8_t* p = w.qs + n0 * rb + s * group_bytes<F>();
    amx_scales<F>(p, rb, valid, out);
    __m512i t[16], qh[16];
    if constexpr (has_mins<F>()) {
        if constexpr (F == Q5_K) amx_load_t(p + 16, rb, qh);
        LD_UNROLL for (int c = 0; c < 2; ++c) {
            amx_load_t(p + (F == Q4_K ? 16 : 48) + 64 * c, rb, t);
            amx_b_k<F>(t, qh, 2 * c, out.wb);
            amx_b_k<F>(t, qh, 2 * c + 1, out.wb);
        }
    } else if constexpr (F == Q6_K) {
        amx_load_t(p + 128, rb, qh);
        LD_UNROLL for (int h = 0; h < 2; ++h) {
            amx_load_t(p + 64 * h, rb, t);
            LD_UNROLL for (int i = 0; i < 4; ++i) amx_b_q6(t, qh, h, i, out.wb);
        }
    } else {
        for (int j = 0; j < 8; ++j) amx_b_q5_0(p, rb, j, valid, out.wb);
    }
}

// ------------------------------------------------------------------ products and float steps

// One tile product into C tile TC (A tile TA, B tile TB), stored to D (the tile intrinsics take the
// register numbers as literals, so this is a macro).
#define LD_AMX_OP(DP, TC, TA, TB, a, b, span, D) \
    do {                                         \
        _tile_loadd(TA, a, span);                \
        _tile_loadd(TB, b, 64);                  \
        _tile_zero(TC);                          \
        DP(TC, TA, TB);                          \
        _tile_stored(TC, D, 64);                 \
    } while (0)

// Four tile products o..o+3 with the dot-product instruction DP (a product's A and B: 16 * span bytes).
#define LD_AMX_OP4(DP, a, b, span, D, o)                                                      \
    do {                                                                                      \
        const int64_t z = 16 * (span);                                                        \
        LD_AMX_OP(DP, 0, 4, 5, (a) + (o) * z, (b) + (o) * z, span, &D[o][0][0]);              \
        LD_AMX_OP(DP, 1, 6, 7, (a) + (o + 1) * z, (b) + (o + 1) * z, span, &D[o + 1][0][0]);  \
        LD_AMX_OP(DP, 2, 4, 5, (a) + (o + 2) * z, (b) + (o + 2) * z, span, &D[o + 2][0][0]);  \
        LD_AMX_OP(DP, 3, 6, 7, (a) + (o + 3) * z, (b) + (o + 3) * z, span, &D[o + 3][0][0]);  \
    } while (0)

// D[o][h * 8 + m][n]: product o's sums for half h, row m of the chunk (xa: its A tiles of this group)
// and weight row n.
template <int F>
void amx_products(const int8_t* xa, const uint8_t* wb, int32_t (*D)[2 * AMX_R][AMX_N]) {
    constexpr int span = amx_span<F>();
    for (int o = 0; o < amx_ops<F>(); o += 4) {
        if constexpr (amx_signed<F>())
            LD_AMX_OP4(_tile_dpbssd, xa, wb, span, D, o);
        else
            LD_AMX_OP4(_tile_dpbsud, xa, wb, span, D, o);
    }
}

// The scales of one group for 16 weight rows, copied to locals so they stay in registers across the rows
// of x (from memory, each step would load two more operands, and at 16 rows and more the load ports, which
// the tile loads share, become the bottleneck).
struct AmxScaleRegs {
    __m512 wd[8], mw[8];  // Q6_K: wd[0] = d
    __m512 sc[16];        // Q6_K
};

template <int F>
inline AmxScaleRegs amx_scale_regs(const AmxWeights& wt) {
    AmxScaleRegs r;
    if constexpr (F == Q6_K) {
        r.wd[0] = wt.d;
        LD_UNROLL for (int g = 0; g < 16; ++g) r.sc[g] = wt.sc[g];
    } else {
        LD_UNROLL for (int j = 0; j < 8; ++j) r.wd[j] = wt.wd[j];
        if constexpr (has_mins<F>())
            LD_UNROLL for (int j = 0; j < 8; ++j) r.mw[j] = wt.mw[j];
    }
    return r;
}

// kq_step for row m of a chunk against 16 weight rows: acc[L] is the one-row accumulator's lane L (the
// sub-block ORDER[L]'s sum; the min term of sub-block L), one weight row per vector lane.
template <int F>
__attribute__((always_inline)) inline void amx_step(const int32_t (*D)[2 * AMX_R][AMX_N], const AmxScaleRegs& w,
                                                    const float* dx, const float* sx, int m, __m512* acc_out) {
    const int32_t* order = has_mins<F>() ? ORDER_K : ORDER_N;
    __m512 acc[8];  // in registers: the compiler cannot tell acc_out from D and would store every update
    LD_UNROLL for (int L = 0; L < 8; ++L) acc[L] = _mm512_load_ps(&acc_out[L]);
    LD_UNROLL for (int L = 0; L < 8; ++L) {
        const int j = order[L];
        __m512 isum;
        if constexpr (F == Q6_K) {  // sc * sum per 16, exact in float (|isum| < 2^24), or cvt's rounding
            const __m512 a = _mm512_cvtepi32_ps(_mm512_load_si512(D[j][m]));
            const __m512 b = _mm512_cvtepi32_ps(_mm512_load_si512(D[j][AMX_R + m]));
            isum = _mm512_fmadd_ps(a, w.sc[2 * j], _mm512_mul_ps(b, w.sc[2 * j + 1]));
        } else {
            isum = _mm512_cvtepi32_ps(_mm512_load_si512(D[j / 2][(j % 2) * AMX_R + m]));
        }
        const __m512 v = _mm512_mul_ps(isum, _mm512_set1_ps(dx[j]));
        acc[L] = _mm512_fmadd_ps(v, F == Q6_K ? w.wd[0] : w.wd[j], acc[L]);
        if constexpr (has_mins<F>()) acc[L] = _mm512_fmadd_ps(w.mw[L], _mm512_set1_ps(sx[L]), acc[L]);
    }
    LD_UNROLL for (int L = 0; L < 8; ++L) _mm512_store_ps(&acc_out[L], acc[L]);
}

// hsum8's order of additions across the lanes' registers: (q + q+4) for q = 0..3, then (0 + 2) + (1 + 3).
inline __m512 amx_hsum8(const __m512* a) {
    __m512 s[4];
    LD_UNROLL for (int q = 0; q < 4; ++q) s[q] = _mm512_add_ps(a[q], a[q + 4]);
    return _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
}

// The 16 weight rows after n0 are one contiguous run of bytes, read group by group across 16 rows, a
// pattern the hardware prefetcher does not follow: while group s of this block is computed, the s-th
// share of the next block's bytes is prefetched.
inline void amx_prefetch(const WQ& w, int64_t n_next, int64_t s, int64_t groups) {
    const int64_t bytes = AMX_N * w.row_bytes, share = (bytes / groups + 63) & ~int64_t(63);
    const char* p = (const char*)(w.qs + n_next * w.row_bytes) + s * share;
    for (int64_t o = 0; o < share; o += 64) _mm_prefetch(p + o, Q_HINT);
}

struct AmxScratch {
    AmxWeights w[2];
    alignas(64) int32_t D[2][8][2 * AMX_R][AMX_N];
    alignas(64) __m512 acc[MB][8];
};

template <int F>
inline int amx_valid(const WQ& w, int64_t s) {  // blocks of group s in the row (Q5_0: fewer in the last)
    return F == Q5_0 ? (int)std::min<int64_t>(8, w.nb - 8 * s) : 8;
}

// Chunk c's float steps of group s (rows mb + 8c ... of x; D: the chunk's tile products).
template <int F>
void amx_steps(const int32_t (*D)[2 * AMX_R][AMX_N], const AmxWeights& wt, const QAct& a, int64_t mb, int64_t rows,
               int64_t c, int64_t s, AmxScratch& t) {
    const AmxScaleRegs w = amx_scale_regs<F>(wt);
    for (int64_t m = c * AMX_R; m < std::min<int64_t>(rows, (c + 1) * AMX_R); ++m) {
        const int64_t o = (mb + m) * a.nbp + 8 * s;
        amx_step<F>(D, w, a.d + o, a.s + o, (int)(m % AMX_R), t.acc[m]);
    }
}

// Weight rows n0..n0+15 against rows mb..mb+rows-1 (at most 64) of x. Software-pipelined over the
// (group, chunk) pairs: the next pair's tile products (and at a group's last chunk, the next group's
// unpacking first) are issued before this pair's float steps, which then read tile stores issued one
// pair earlier (measured 3-5% faster than products and steps in turn).
template <int F>
void amx_block(const WQ& w, int64_t n0, const QAct& a, const int8_t* xv, int64_t M, int64_t mb, int64_t rows,
               float* y, int64_t ldy, AmxScratch& t) {
    const int64_t groups = (w.nb + 7) / 8, per_chunk = 16 * groups * QKK, chunks = amx_chunks(rows);
    const int8_t* xa = xv + mb / AMX_R * per_chunk;
    memset(t.acc, 0, sizeof(t.acc[0]) * rows);
    amx_unpack<F>(w, n0, 0, amx_valid<F>(w, 0), t.w[0]);
    amx_products<F>(xa, t.w[0].wb, t.D[0]);
    for (int64_t i = 0, n = groups * chunks; i < n; ++i) {
        const int64_t s = i / chunks, c = i % chunks, s1 = (i + 1) / chunks, c1 = (i + 1) % chunks;
        if (c == 0) amx_prefetch(w, n0 + AMX_N, s, groups);
        if (i + 1 < n && c1 == 0) amx_unpack<F>(w, n0, s1, amx_valid<F>(w, s1), t.w[s1 % 2]);
        if (i + 1 < n) amx_products<F>(xa + c1 * per_chunk + s1 * 16 * QKK, t.w[s1 % 2].wb, t.D[(i + 1) % 2]);
        amx_steps<F>(t.D[i % 2], t.w[s % 2], a, mb, rows, c, s, t);
    }
    for (int64_t m = 0; m < rows; ++m) _mm512_storeu_ps(y + (mb + m) * ldy + n0, amx_hsum8(t.acc[m]));
}

// Rows [n_begin, n_end) of the weights against all M rows of x: 16 weight rows at a time through the tile
// unit, the last few (fewer than 16) with the one-row tiles, which compute the same bits.
template <int F>
void amx_range(const WQ& w, const Inputs& in, const int8_t* xv, int64_t M, int64_t n_begin, int64_t n_end, float* y,
               int64_t ldy) {
    amx_config(amx_span<F>());
    static thread_local AmxScratch t;
    int64_t n0 = n_begin;
    for (; n0 + AMX_N <= n_end; n0 += AMX_N)
        for (int64_t mb = 0; mb < M; mb += MB)
            amx_block<F>(w, n0, in.a, xv, M, mb, std::min<int64_t>(MB, M - mb), y, ldy, t);
    for (; n0 < n_end; ++n0)
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int mr = (int)std::min<int64_t>(8, M - m0);
            T_KQ_Q8[kq_index(F)][0][mr - 1](w, n0, in, m0, y, ldy);
        }
    _tile_release();
}

using AmxFn = void (*)(const WQ&, const Inputs&, const int8_t*, int64_t, int64_t, int64_t, float*, int64_t);
const AmxFn T_KQ_AMX[4] = {amx_range<Q4_K>, amx_range<Q5_K>, amx_range<Q6_K>, amx_range<Q5_0>};

}  // namespace
