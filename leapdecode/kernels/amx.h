// Intel AMX int8 tiles for the K-quant formats (Q4_K, Q5_K, Q6_K, Q5_0) with int8 activations, for 2-64
// rows of x (verification and prefill). Included by native.cpp in the AMX build (after kquant.h).
//
// Row invariance: kquant.h reduces every format to exact int32 sums per sub-block (`isum`) followed by one
// fixed sequence of float32 operations per output (kq_step, then hsum8). Here the integer sums come from
// the tile unit (TDPBUSD: unsigned weights x signed activations) and the float sequence is kq_step's, lane
// for lane, evaluated for 8 rows of x side by side. Integer sums do not depend on how they are formed, and
// the float operations are the same operations on the same values in the same order, so every output has
// the bits of the one-row tile.
//
// Layout. A tile product C[n][c] += A[n][k] B[k/4][4c + k%4] takes A = 16 weight rows unpacked to a byte
// per weight (`wb`, 256 bytes a row per group, in the order of kq_unpack's registers, which the grouped
// activations share) and B = 8 rows of x packed by amx_pack_act so that C's 16 columns are two halves of
// the product's span times 8 rows: a product over 64 weights yields the sums of both sub-blocks of 32
// (Q6_K: over 32 weights, both halves of 16, whose scales differ) for 8 rows, one register per weight row.
// The two sub-blocks of product q are exactly the one-row accumulator's lanes q and q + 4 (kq_unpack's
// register order and ORDER), the pair hsum8 adds first, so accumulators hold [lane q | lane q + 4] x 8 rows.
// The OS must have granted this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM) before the
// library is used; the Python side asks once (build.py).
#pragma once

namespace {

constexpr int AMX_N = 16;  // weight rows (outputs) per tile product
constexpr int AMX_R = 8;   // rows of x per chunk; C's columns are 2 x AMX_R
constexpr int AMX_CHUNKS = MB / AMX_R;

template <int F>
constexpr int amx_span() {  // weights per tile product: two sub-blocks (Q6_K: two scale groups of 16)
    return F == Q6_K ? 32 : 64;
}
template <int F>
constexpr int amx_ops() {  // tile products per group of 256
    return QKK / amx_span<F>();
}

// Q6_K and Q5_0 weights go to the tile unit with their offset removed (q - 32, q - 16: signed bytes), so
// the integer sums need no activation sums; Q4_K and Q5_K weights are unsigned.
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

// Tiles 0-3: C (16 x 16 int32); 4, 6: A (16 weight rows x span bytes); 5, 7: B (span / 4 rows x 64 bytes).
inline void amx_config(int span) {
    TileConfig c{};
    c.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        const bool b = t >= 4 && t % 2 == 1;
        c.rows[t] = (uint8_t)(b ? span / 4 : AMX_N);
        c.colsb[t] = (uint16_t)(t >= 4 && !b ? span : 64);
    }
    _tile_loadconfig(&c);
}

// The activation side of one group for a chunk of 8 rows, as the accumulators' pairs [lane q | lane q+4].
struct AmxActGroup {
    alignas(64) float dx[4][16], sx[4][16];
};

inline int64_t amx_groups(int64_t K) { return (K / QK + 7) / 8; }
inline int64_t amx_chunks(int64_t M) { return (M + AMX_R - 1) / AMX_R; }

// Bytes amx_pack_act writes for M rows of K: per chunk of 8 rows, the packed values (16 bytes per k),
// then one AmxActGroup per group.
inline size_t amx_act_bytes(int64_t M, int64_t K) {
    return (size_t)(amx_chunks(M) * (16 * amx_groups(K) * QKK + amx_groups(K) * (int64_t)sizeof(AmxActGroup)));
}

// x's int8 rows (q [M, K], in quantize_row's layout for F) in the B layout: for product o of span bytes,
// B[r][4(h * 8 + m) + t] = x[m][span o + 4r + t] where 4r lies in half h, zero elsewhere and past K.
template <int F>
void amx_pack_values(const int8_t* q, int64_t M, int64_t K, int64_t c, int8_t* out) {
    constexpr int span = amx_span<F>(), rows = span / 4;
    const int64_t ops = amx_groups(K) * amx_ops<F>();
    memset(out, 0, (size_t)(ops * rows * 64));
    for (int m = 0; m < AMX_R && c * AMX_R + m < M; ++m) {
        const int8_t* x = q + (c * AMX_R + m) * K;
        for (int64_t o = 0; o < ops; ++o)
            for (int r = 0; r < rows && o * span + 4 * r < K; ++r) {
                const int h = 4 * r / (span / 2);
                memcpy(out + (o * rows + r) * 64 + 4 * (h * AMX_R + m), x + o * span + 4 * r, 4);
            }
    }
}

template <int F>
void amx_pack_scales(const QAct& a, int64_t M, int64_t c, int64_t s, AmxActGroup& g) {
    const int32_t* order = has_mins<F>() ? ORDER_K : ORDER_N;
    memset(&g, 0, sizeof(g));
    for (int m = 0; m < AMX_R && c * AMX_R + m < M; ++m) {
        const int64_t r = c * AMX_R + m;
        const float* d = a.d + r * a.nbp + 8 * s;
        const float* sx = a.s + r * a.nbp + 8 * s;
        for (int q = 0; q < 4; ++q)
            for (int h = 0; h < 2; ++h) {
                g.dx[q][h * AMX_R + m] = d[order[q + 4 * h]];
                g.sx[q][h * AMX_R + m] = sx[q + 4 * h];
            }
    }
}

template <int F>
void amx_pack(const QAct& a, int64_t M, int64_t K, int8_t* xv) {
    const int64_t groups = amx_groups(K), per_chunk = 16 * groups * QKK;
    AmxActGroup* scales = (AmxActGroup*)(xv + amx_chunks(M) * per_chunk);
    for (int64_t c = 0; c < amx_chunks(M); ++c) {
        amx_pack_values<F>(a.q, M, K, c, xv + c * per_chunk);
        for (int64_t s = 0; s < groups; ++s) amx_pack_scales<F>(a, M, c, s, scales[c * groups + s]);
    }
}

void amx_pack_act(int fmt, const QAct& a, int64_t M, int64_t K, int8_t* xv) {
    if (fmt == Q4_K) return amx_pack<Q4_K>(a, M, K, xv);
    if (fmt == Q5_K) return amx_pack<Q5_K>(a, M, K, xv);
    if (fmt == Q6_K) return amx_pack<Q6_K>(a, M, K, xv);
    amx_pack<Q5_0>(a, M, K, xv);
}

// The weight side of one group for 16 rows: unpacked values and the scales as accumulator pairs.
struct AmxWeights {
    alignas(64) uint8_t wb[AMX_N][QKK];
    alignas(64) __m512 wd[AMX_N][4], mw[AMX_N][4];
    alignas(64) __m512i sc[AMX_N][8];  // Q6_K: [sc[2j] x 8 | sc[2j+1] x 8] for sub-block j
};

// Lanes [q x 8 | q + 4 x 8] of an 8-lane vector (in the low half of a 512-bit one).
inline __m512i pair_index(int q) {
    return _mm512_inserti64x4(_mm512_set1_epi32(q), _mm256_set1_epi32(q + 4), 1);
}

template <int F>
void amx_unpack(const WQ& w, int64_t n0, int64_t s, int valid, AmxWeights& out) {
    for (int n = 0; n < AMX_N; ++n) {
        const uint8_t* p = w.qs + (n0 + n) * w.row_bytes + s * group_bytes<F>();
        const KScales ks = kq_scales<F>(p, valid);
        const __m512 wd = _mm512_castps256_ps512(ks.wd);
        LD_UNROLL for (int q = 0; q < 4; ++q) {
            out.wd[n][q] = _mm512_permutexvar_ps(pair_index(q), wd);
            if constexpr (has_mins<F>()) out.mw[n][q] = _mm512_permutexvar_ps(pair_index(q), _mm512_castps256_ps512(ks.mw));
        }
        if constexpr (F == Q6_K) {
            const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 192)));
            LD_UNROLL for (int j = 0; j < 8; ++j)
                out.sc[n][j] = _mm512_permutexvar_epi32(
                    _mm512_inserti64x4(_mm512_set1_epi32(2 * j), _mm256_set1_epi32(2 * j + 1), 1), sc);
        }
        const KWeights kw = kq_unpack<F>(p, valid);
        const __m512i offset = _mm512_set1_epi8(F == Q6_K ? 32 : F == Q5_0 ? 16 : 0);
        LD_UNROLL for (int r = 0; r < 4; ++r) {
            const __m512i u = amx_signed<F>() ? _mm512_sub_epi8(kw.u[r], offset) : kw.u[r];
            _mm512_store_si512(out.wb[n] + 64 * r, u);
        }
    }
}

// One tile product into C tile TC (A tile TA, B tile TB), stored to D (the tile intrinsics take the
// register numbers as literals, so this is a macro).
#define LD_AMX_OP(DP, TC, TA, TB, a, b, D) \
    do {                                   \
        _tile_loadd(TA, a, QKK);           \
        _tile_loadd(TB, b, 64);            \
        _tile_zero(TC);                    \
        DP(TC, TA, TB);                    \
        _tile_stored(TC, D, 64);           \
    } while (0)

// Four tile products o..o+3 with the dot-product instruction DP.
#define LD_AMX_OP4(DP, a, b, span, bytes, D, o)                                         \
    do {                                                                                \
        LD_AMX_OP(DP, 0, 4, 5, a, b, &D[o][0][0]);                                      \
        LD_AMX_OP(DP, 1, 6, 7, (a) + (span), (b) + (bytes), &D[o + 1][0][0]);           \
        LD_AMX_OP(DP, 2, 4, 5, (a) + 2 * (span), (b) + 2 * (bytes), &D[o + 2][0][0]);   \
        LD_AMX_OP(DP, 3, 6, 7, (a) + 3 * (span), (b) + 3 * (bytes), &D[o + 3][0][0]);   \
    } while (0)


// D[o][n][16]: the integer products of the group's tile products for 16 weight rows and a chunk of x (xb:
// the chunk's packed values of this group).
template <int F>
void amx_products(const AmxWeights& wt, const int8_t* xb, int valid, int32_t (*D)[AMX_N][16]) {
    constexpr int span = amx_span<F>(), ops = amx_ops<F>(), bytes = span * 16;
    if (F == Q5_0 && valid < 8) {  // a row's last, partial group: no activations past its last block
        const int live = (valid + 1) / 2;
        for (int o = 0; o < live; ++o) LD_AMX_OP(_tile_dpbssd, 0, 4, 5, &wt.wb[0][o * span], xb + o * bytes, &D[o][0][0]);
        memset(D[live], 0, sizeof(D[0]) * (ops - live));
        return;
    }
    for (int o = 0; o < ops; o += 4) {
        const uint8_t* a = &wt.wb[0][o * span];
        const int8_t* b = xb + o * bytes;
        if constexpr (amx_signed<F>())
            LD_AMX_OP4(_tile_dpbssd, a, b, span, bytes, D, o);
        else
            LD_AMX_OP4(_tile_dpbusd, a, b, span, bytes, D, o);
    }
}

// The pair [isum of lane q's sub-block | lane q + 4's] x 8 rows for weight row n: kq_dot minus kq_offset.
template <int F>
inline __m512i amx_isum(const int32_t (*D)[AMX_N][16], const AmxWeights& wt, const AmxActGroup& x, int n, int q) {
    if constexpr (F != Q6_K) return _mm512_load_si512(D[q][n]);
    __m512i z[2];  // Q6_K: sub-blocks 2q and 2q + 1, each [first 16 | second 16] x 8 rows
    LD_UNROLL for (int h = 0; h < 2; ++h) z[h] = _mm512_mullo_epi32(_mm512_load_si512(D[2 * q + h][n]), wt.sc[n][2 * q + h]);
    return _mm512_add_epi32(_mm512_shuffle_i64x2(z[0], z[1], 0x44), _mm512_shuffle_i64x2(z[0], z[1], 0xEE));
}

// kq_step for a chunk of 8 rows: acc[n][q] holds the one-row accumulator's lanes q and q + 4.
template <int F>
void amx_steps(const int32_t (*D)[AMX_N][16], const AmxWeights& wt, const AmxActGroup& x, __m512 (*acc)[4]) {
    for (int n = 0; n < AMX_N; ++n) {
        LD_UNROLL for (int q = 0; q < 4; ++q) {
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(amx_isum<F>(D, wt, x, n, q)), _mm512_load_ps(x.dx[q]));
            __m512 a = _mm512_fmadd_ps(v, wt.wd[n][q], acc[n][q]);
            if constexpr (has_mins<F>()) a = _mm512_fmadd_ps(wt.mw[n][q], _mm512_load_ps(x.sx[q]), a);
            acc[n][q] = a;
        }
    }
}

// hsum8's order of additions, for 8 rows at once: (lane q + lane q+4) for q = 0..3, then (0 + 2) + (1 + 3).
inline __m256 amx_hsum8(const __m512* a) {
    __m256 s[4];
    LD_UNROLL for (int q = 0; q < 4; ++q)
        s[q] = _mm256_add_ps(_mm512_castps512_ps256(a[q]), _mm512_extractf32x8_ps(a[q], 1));
    return _mm256_add_ps(_mm256_add_ps(s[0], s[2]), _mm256_add_ps(s[1], s[3]));
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
    AmxWeights w;
    alignas(64) int32_t D[8][AMX_N][16];
    alignas(64) __m512 acc[AMX_CHUNKS][AMX_N][4];
};

// Weight rows n0..n0+15 against rows mb..mb+rows-1 (at most 64) of x.
template <int F>
void amx_block(const WQ& w, int64_t n0, const int8_t* xv, int64_t M, int64_t mb, int64_t rows, float* y,
               int64_t ldy, AmxScratch& t) {
    const int64_t groups = (w.nb + 7) / 8, per_chunk = 16 * groups * QKK;
    const AmxActGroup* scales = (const AmxActGroup*)(xv + amx_chunks(M) * per_chunk);
    const int64_t c0 = mb / AMX_R, chunks = amx_chunks(rows);
    memset(t.acc, 0, sizeof(t.acc[0]) * chunks);
    for (int64_t s = 0; s < groups; ++s) {
        const int valid = F == Q5_0 ? (int)std::min<int64_t>(8, w.nb - 8 * s) : 8;
        amx_prefetch(w, n0 + AMX_N, s, groups);
        amx_unpack<F>(w, n0, s, valid, t.w);
        for (int64_t c = 0; c < chunks; ++c) {
            amx_products<F>(t.w, xv + (c0 + c) * per_chunk + s * 16 * QKK, valid, t.D);
            amx_steps<F>(t.D, t.w, scales[(c0 + c) * groups + s], t.acc[c]);
        }
    }
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t m0 = mb + c * AMX_R, n_rows = std::min<int64_t>(AMX_R, mb + rows - m0);
        for (int n = 0; n < AMX_N; ++n) {
            alignas(32) float out[AMX_R];
            _mm256_store_ps(out, amx_hsum8(t.acc[c][n]));
            for (int64_t m = 0; m < n_rows; ++m) y[(m0 + m) * ldy + n0 + n] = out[m];
        }
    }
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
        for (int64_t mb = 0; mb < M; mb += MB) amx_block<F>(w, n0, xv, M, mb, std::min<int64_t>(MB, M - mb), y, ldy, t);
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
