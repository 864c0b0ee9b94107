// Intel AMX int8 tiles for the K-quant formats (Q4_K, Q5_K, Q6_K, Q5_0) with int8 activations, for 2-64
// rows of x (verification and prefill). Included by native.cpp in the AMX build (after kquant.h).
//
// Row invariance: kquant.h reduces every format to exact int32 sums per sub-block (`isum`) followed by one
// fixed sequence of float32 operations per output. Here the integer sums come from the tile unit
// (TDPBUSD: unsigned weights x signed activations, one tile product per sub-block, or per 16 weights for
// Q6_K whose scales change every 16), and the float sequence is the same as kq_step's, lane for lane,
// evaluated with the output rows of x side by side in a register instead of the sub-blocks. Integer sums
// do not depend on how they are formed and the float operations are the same operations on the same
// values in the same order, so every output has the bits of the one-row tile.
//
// Layout. A tile product C[n][m] += A[n][k] B[k/4][4m + k%4] takes A = 16 weight rows, unpacked to one
// byte per weight (`wb`, 256 bytes a row per group, the order of kq_unpack's registers, which the grouped
// activations share), and B = 16 rows of activations in the tile unit's layout (amx_pack_act: 4 bytes of a
// row, then the same 4 of the next row). The OS must have granted this process the tile data state
// (arch_prctl ARCH_REQ_XCOMP_PERM) before the library is used; the Python side asks once (build.py).
#pragma once

namespace {

constexpr int AMX_ROWS = 16;   // weight rows (outputs) per tile product, and rows of x per column of C
constexpr int AMX_CHUNKS = 4;  // 16-row chunks of x per pass (MB = 64 rows)
static_assert(AMX_ROWS * AMX_CHUNKS == MB, "a pass over the weights covers MB rows of x");

struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Tiles 0-3: C (16 x 16 int32); 4: A (16 weight rows x `unit` bytes); 5: B (unit / 4 rows x 64 bytes).
inline void amx_config(int unit) {
    TileConfig c{};
    c.palette_id = 1;
    for (int t = 0; t < 4; ++t) {
        c.rows[t] = AMX_ROWS;
        c.colsb[t] = 64;
    }
    c.rows[4] = AMX_ROWS;
    c.colsb[4] = (uint16_t)unit;
    c.rows[5] = (uint8_t)(unit / 4);
    c.colsb[5] = 64;
    _tile_loadconfig(&c);
}

// x's int8 rows (q [M, K], in the layout quantize_row wrote) to the tile unit's B layout: per chunk of 16
// rows, xv[c][k / 4][m][4] (rows past M are zeros).
void amx_pack_act(const int8_t* q, int64_t M, int64_t K, int8_t* xv) {
    const int64_t chunks = (M + AMX_ROWS - 1) / AMX_ROWS, words = K / 4;
    for (int64_t c = 0; c < chunks; ++c) {
        int32_t* out = (int32_t*)(xv + c * AMX_ROWS * K);
        for (int m = 0; m < AMX_ROWS; ++m) {
            const int64_t row = c * AMX_ROWS + m;
            const int32_t* in = (const int32_t*)(q + row * K);
            for (int64_t t = 0; t < words; ++t) out[t * AMX_ROWS + m] = row < M ? in[t] : 0;
        }
    }
}

inline size_t amx_act_bytes(int64_t M, int64_t K) { return (size_t)((M + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS * K); }

// Position of sub-block j among the 32-byte units of `wb` and of grouped activations (kq_unpack's order).
template <int F>
constexpr int kq_pos(int j) {
    return has_mins<F>() ? (j & 4) | (j & 1) << 1 | (j & 2) >> 1 : j;
}

// The weight side of one group for 16 rows: unpacked values, float scales per lane (as kq_scales), and
// Q6_K's integer scales.
struct AmxWeights {
    alignas(64) uint8_t wb[AMX_ROWS][QKK];
    alignas(64) float wd[AMX_ROWS][8], mw[AMX_ROWS][8];
    alignas(64) int32_t sc[AMX_ROWS][16];
};

template <int F>
void amx_unpack(const WQ& w, int64_t n0, int64_t s, int valid, AmxWeights& out) {
    for (int n = 0; n < AMX_ROWS; ++n) {
        const uint8_t* p = w.qs + (n0 + n) * w.row_bytes + s * group_bytes<F>();
        const uint8_t* ahead = p + 2 * group_bytes<F>();
        for (int64_t o = 0; o < group_bytes<F>(); o += 64) _mm_prefetch((const char*)(ahead + o), Q_HINT);
        const KScales ks = kq_scales<F>(p, valid);
        _mm256_store_ps(out.wd[n], ks.wd);
        _mm256_store_ps(out.mw[n], ks.mw);
        if constexpr (F == Q6_K)
            for (int g = 0; g < 16; ++g) out.sc[n][g] = (int8_t)p[192 + g];
        const KWeights kw = kq_unpack<F>(p, valid);
        LD_UNROLL for (int r = 0; r < 4; ++r) _mm512_store_si512(out.wb[n] + 64 * r, kw.u[r]);
    }
}

// The activation side of one group for a chunk of 16 rows, transposed: [lane or block][m].
struct AmxAct {
    alignas(64) float dx[8][AMX_ROWS], sx[8][AMX_ROWS];
    alignas(64) int32_t xs[16][AMX_ROWS];
};

template <int F>
void amx_act(const QAct& a, int64_t m0, int rows, int64_t s, AmxAct& out) {
    for (int m = 0; m < AMX_ROWS; ++m) {
        const int64_t r = m0 + m;
        for (int j = 0; j < 8; ++j) {
            out.dx[j][m] = m < rows ? a.d[r * a.nbp + 8 * s + j] : 0.0f;
            out.sx[j][m] = m < rows ? a.s[r * a.nbp + 8 * s + j] : 0.0f;
        }
        if constexpr (!has_mins<F>())
            for (int g = 0; g < 16; ++g) out.xs[g][m] = m < rows ? a.xs[r * 2 * a.nbp + 16 * s + g] : 0;
    }
}

// D[u][n][m]: the integer products of each tile unit u of the group (32 weights; Q6_K 16) for 16 weight
// rows and the chunk's 16 rows of x (xv: the chunk's packed rows).
template <int F>
void amx_products(const AmxWeights& wt, const int8_t* xv, int64_t s, int valid, int32_t (*D)[AMX_ROWS][AMX_ROWS]) {
    constexpr int UNIT = F == Q6_K ? 16 : 32, U = QKK / UNIT;
    for (int u = 0; u < U; ++u) {
        if (F == Q5_0 && u >= valid) {  // past the row's last block: no activations there
            memset(D[u], 0, sizeof(D[u]));
            continue;
        }
        _tile_loadd(4, &wt.wb[0][u * UNIT], QKK);
        _tile_loadd(5, xv + (s * QKK + u * UNIT) / 4 * 64, 64);
        _tile_zero(0);
        _tile_dpbusd(0, 4, 5);
        _tile_stored(0, D[u], 64);
    }
}

// isum of sub-block j for weight row n, all 16 rows of the chunk: kq_dot's sum minus kq_offset's.
template <int F>
inline __m512i amx_isum(const int32_t (*D)[AMX_ROWS][AMX_ROWS], const AmxWeights& wt, const AmxAct& x, int n, int j) {
    if constexpr (has_mins<F>()) return _mm512_load_si512(D[kq_pos<F>(j)][n]);
    if constexpr (F == Q5_0) {
        const __m512i xsum = _mm512_add_epi32(_mm512_load_si512(x.xs[2 * j]), _mm512_load_si512(x.xs[2 * j + 1]));
        return _mm512_sub_epi32(_mm512_load_si512(D[j][n]), _mm512_slli_epi32(xsum, 4));
    }
    const __m512i s0 = _mm512_set1_epi32(wt.sc[n][2 * j]), s1 = _mm512_set1_epi32(wt.sc[n][2 * j + 1]);
    const __m512i dot = _mm512_add_epi32(_mm512_mullo_epi32(s0, _mm512_load_si512(D[2 * j][n])),
                                         _mm512_mullo_epi32(s1, _mm512_load_si512(D[2 * j + 1][n])));
    const __m512i off = _mm512_add_epi32(_mm512_mullo_epi32(s0, _mm512_load_si512(x.xs[2 * j])),
                                         _mm512_mullo_epi32(s1, _mm512_load_si512(x.xs[2 * j + 1])));
    return _mm512_sub_epi32(dot, _mm512_slli_epi32(off, 5));
}

// kq_step for 16 rows of x at once: lane i of the one-row accumulator is acc[i] here.
template <int F>
void amx_steps(const int32_t (*D)[AMX_ROWS][AMX_ROWS], const AmxWeights& wt, const AmxAct& x, float (*acc)[8][AMX_ROWS]) {
    const int32_t* order = has_mins<F>() ? ORDER_K : ORDER_N;
    for (int n = 0; n < AMX_ROWS; ++n) {
        LD_UNROLL for (int i = 0; i < 8; ++i) {
            const int j = order[i];
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(amx_isum<F>(D, wt, x, n, j)), _mm512_load_ps(x.dx[j]));
            __m512 a = _mm512_fmadd_ps(v, _mm512_set1_ps(wt.wd[n][i]), _mm512_load_ps(acc[n][i]));
            if constexpr (has_mins<F>()) a = _mm512_fmadd_ps(_mm512_set1_ps(wt.mw[n][i]), _mm512_load_ps(x.sx[i]), a);
            _mm512_store_ps(acc[n][i], a);
        }
    }
}

// hsum8's order of additions, for 16 rows of x at once.
inline __m512 amx_hsum8(const float (*a)[AMX_ROWS]) {
    const __m512 s0 = _mm512_add_ps(_mm512_load_ps(a[0]), _mm512_load_ps(a[4]));
    const __m512 s1 = _mm512_add_ps(_mm512_load_ps(a[1]), _mm512_load_ps(a[5]));
    const __m512 s2 = _mm512_add_ps(_mm512_load_ps(a[2]), _mm512_load_ps(a[6]));
    const __m512 s3 = _mm512_add_ps(_mm512_load_ps(a[3]), _mm512_load_ps(a[7]));
    return _mm512_add_ps(_mm512_add_ps(s0, s2), _mm512_add_ps(s1, s3));
}

struct AmxScratch {
    AmxWeights w;
    AmxAct x;
    alignas(64) int32_t D[16][AMX_ROWS][AMX_ROWS];
    alignas(64) float acc[AMX_CHUNKS][AMX_ROWS][8][AMX_ROWS];
};

// Weight rows n0..n0+15 against rows mb..mb+rows-1 (at most 64) of x.
template <int F>
void amx_block(const WQ& w, int64_t n0, const Inputs& in, const int8_t* xv, int64_t mb, int64_t rows, float* y,
               int64_t ldy, AmxScratch& t) {
    const int64_t groups = (w.nb + 7) / 8, chunks = (rows + AMX_ROWS - 1) / AMX_ROWS;
    memset(t.acc, 0, sizeof(float) * chunks * AMX_ROWS * 8 * AMX_ROWS);
    for (int64_t s = 0; s < groups; ++s) {
        const int valid = F == Q5_0 ? (int)std::min<int64_t>(8, w.nb - 8 * s) : 8;
        amx_unpack<F>(w, n0, s, valid, t.w);
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t m0 = mb + c * AMX_ROWS;
            amx_products<F>(t.w, xv + m0 * in.a.K, s, valid, t.D);
            amx_act<F>(in.a, m0, (int)std::min<int64_t>(AMX_ROWS, mb + rows - m0), s, t.x);
            amx_steps<F>(t.D, t.w, t.x, t.acc[c]);
        }
    }
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t m0 = mb + c * AMX_ROWS, n_rows = std::min<int64_t>(AMX_ROWS, mb + rows - m0);
        for (int n = 0; n < AMX_ROWS; ++n) {
            alignas(64) float out[AMX_ROWS];
            _mm512_store_ps(out, amx_hsum8(t.acc[c][n]));
            for (int64_t m = 0; m < n_rows; ++m) y[(m0 + m) * ldy + n0 + n] = out[m];
        }
    }
}

// Rows [n_begin, n_end) of the weights against all M rows of x: 16 weight rows at a time through the tile
// unit, the last few (fewer than 16) with the one-row tiles, which compute the same bits.
template <int F>
void amx_range(const WQ& w, const Inputs& in, const int8_t* xv, int64_t M, int64_t n_begin, int64_t n_end, float* y,
               int64_t ldy) {
    amx_config(F == Q6_K ? 16 : 32);
    static thread_local AmxScratch t;
    int64_t n0 = n_begin;
    for (; n0 + AMX_ROWS <= n_end; n0 += AMX_ROWS)
        for (int64_t mb = 0; mb < M; mb += MB) amx_block<F>(w, n0, in, xv, mb, std::min<int64_t>(MB, M - mb), y, ldy, t);
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
