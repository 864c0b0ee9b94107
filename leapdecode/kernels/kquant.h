// GGUF K-quant (Q4_K, Q5_K, Q6_K) and Q5_0 weights, run on their blocks exactly as the file stores them
// (included by native.cpp after its tiles). A row of weights is the file's row of blocks, byte for byte:
//
//   Q4_K  144 bytes per 256: d, dmin fp16; 12 bytes of 6-bit scales sc[8] and mins m[8]; 128 bytes of
//         nibbles (bytes 32i..32i+31: sub-block 2i in the low nibbles, 2i+1 in the high ones).
//         value = (d * sc[j]) * q - dmin * m[j], q in 0..15, for sub-block j of 32
//   Q5_K  176 bytes per 256: as Q4_K with 32 bytes of fifth bits (bit j of byte l: element l of sub-block
//         j) before the nibbles; q in 0..31
//   Q6_K  210 bytes per 256: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16
//         elements), d fp16.  value = (d * sc[e / 16]) * (q - 32), q in 0..63
//   Q5_0  22 bytes per 32: d fp16, 32 fifth bits, 16 bytes of nibbles.  value = d * (q - 16)
//
// With int8 activations (quantized per 32, scale d_x, see QAct) every format is reduced to the same
// shape: per group of 256 weights (8 sub-blocks of 32; Q5_0: 8 blocks, fewer in a row's last group) an
// exact int32 sum per sub-block, `isum`, holding everything integer (Q6_K's 16-wide scales and offset,
// Q5_0's offset), then one fixed sequence of float32 operations per output:
//
//   acc = fma(float(isum) * dx, wd, acc)      lanes: sub-blocks in the format's ORDER
//   acc = fma(mw, sx, acc)                    Q4_K, Q5_K only; lanes: sub-blocks 0..7 in turn
//   y   = hsum8(acc)
//
// with dx the activations' block scales, wd the weights' (d * sc, d, or d per block), mw = -(dmin * m)
// and sx = d_x * sum(q_x). How the integer sums are formed (AVX-512 VNNI on 64 bytes at a time, AVX2 on
// 32) never shows in them, so both builds and every tile shape give the same bits for every output.
// Float32 activations: each group is dequantized exactly as GGUF does it, then multiplied (tile_kq_f32).
#pragma once

namespace {

constexpr int QKK = 256;  // weights per super-block

template <int F>
constexpr int64_t group_bytes() {  // bytes of 256 weights as stored
    return F == Q4_K ? 144 : F == Q5_K ? 176 : F == Q6_K ? 210 : 8 * 22;
}
template <int F>
constexpr bool has_mins() {
    return F == Q4_K || F == Q5_K;
}

inline bool is_kquant(int fmt) { return fmt == Q4_K || fmt == Q5_K || fmt == Q6_K || fmt == Q5_0; }

// Bytes of one row of K weights in format `fmt` (K a multiple of its block).
inline int64_t kq_row_bytes(int fmt, int64_t K) {
    if (fmt == Q5_0) return K / QK * 22;
    return K / QKK * (fmt == Q4_K ? 144 : fmt == Q5_K ? 176 : 210);
}

// The lane of each sub-block's sum: the order the AVX-512 reduction (reduce4) leaves them in, which the
// AVX2 build reproduces. Q4_K/Q5_K: registers (sb 0|2, 1|3, 4|6, 5|7); Q6_K/Q5_0: (0|1, 2|3, 4|5, 6|7).
alignas(32) constexpr int32_t ORDER_K[8] = {0, 1, 4, 5, 2, 3, 6, 7};
alignas(32) constexpr int32_t ORDER_N[8] = {0, 2, 4, 6, 1, 3, 5, 7};

template <int F>
inline __m256i lane_order() {
    return _mm256_load_si256((const __m256i*)(has_mins<F>() ? ORDER_K : ORDER_N));
}

inline uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}
inline uint32_t load_u32(const uint8_t* p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

// The 6-bit scales and mins of Q4_K/Q5_K (12 bytes), 8 bytes each, sub-block j in byte j.
inline void k_scales(const uint8_t* s, uint64_t* sc, uint64_t* mn) {
    const uint32_t u0 = load_u32(s), u1 = load_u32(s + 4), u2 = load_u32(s + 8);
    const uint32_t sc_hi = (u2 & 0x0f0f0f0fu) | ((u0 >> 2) & 0x30303030u);
    const uint32_t mn_hi = ((u2 >> 4) & 0x0f0f0f0fu) | ((u1 >> 2) & 0x30303030u);
    *sc = (uint64_t)(u0 & 0x3f3f3f3fu) | (uint64_t)sc_hi << 32;
    *mn = (uint64_t)(u1 & 0x3f3f3f3fu) | (uint64_t)mn_hi << 32;
}

// The weight side of one group: float scales and, for Q6_K, the integer ones.
struct KScales {
    __m256 wd;   // per lane (ORDER): d * sc[j] (Q4_K, Q5_K), d (Q6_K), d of block j (Q5_0)
    __m256 mw;   // sub-blocks 0..7: -(dmin * m[j]) (Q4_K, Q5_K)
    __m256i sc;  // Q6_K: the 16 int8 scales as int16, pairs (one sub-block) in ORDER
};

template <int F>
inline KScales kq_scales(const uint8_t* p, int valid) {
    KScales k;
    const __m256i order = lane_order<F>();
    if constexpr (has_mins<F>()) {
        uint64_t sc, mn;
        k_scales(p + 4, &sc, &mn);
        const __m256i sc8 = _mm256_permutevar8x32_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((int64_t)sc)), order);
        k.wd = _mm256_mul_ps(_mm256_cvtepi32_ps(sc8), _mm256_set1_ps(f16(load_u16(p))));  // exact products
        const __m256 m8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((int64_t)mn)));
        k.mw = _mm256_xor_ps(_mm256_mul_ps(m8, _mm256_set1_ps(f16(load_u16(p + 2)))), _mm256_set1_ps(-0.0f));
    } else if constexpr (F == Q6_K) {
        k.wd = _mm256_set1_ps(f16(load_u16(p + 208)));
        k.sc = _mm256_permutevar8x32_epi32(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(p + 192))), order);
    } else {  // Q5_0: the scale of each block, zero past the row's last block
        alignas(16) uint16_t h[8];
        for (int j = 0; j < 8; ++j) h[j] = j < valid ? load_u16(p + 22 * j) : 0;
        k.wd = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_load_si128((const __m128i*)h)), order);
    }
    return k;
}

// The activation side of one group of row m.
struct KAct {
    __m256 dx, sx;
    __m256i xs;  // per-16 sums of q_x as int16, pairs in ORDER (Q6_K, Q5_0)
};

template <int F>
inline KAct kq_act(const QAct& a, int64_t m, int64_t s) {
    KAct x;
    const __m256i order = lane_order<F>();
    x.dx = _mm256_permutevar8x32_ps(_mm256_loadu_ps(a.d + m * a.nbp + 8 * s), order);
    if constexpr (has_mins<F>()) x.sx = _mm256_loadu_ps(a.s + m * a.nbp + 8 * s);
    if constexpr (!has_mins<F>())
        x.xs = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i*)(a.xs + m * 2 * a.nbp + 16 * s)), order);
    return x;
}

// The integer part the unsigned weights leave out: Q6_K 32 * sum_g sc_g * xsum_g, Q5_0 16 * xsum.
template <int F>
inline __m256i kq_offset(const KScales& w, const KAct& x) {
    if constexpr (F == Q6_K) return _mm256_slli_epi32(_mm256_madd_epi16(w.sc, x.xs), 5);
    if constexpr (F == Q5_0) return _mm256_madd_epi16(x.xs, _mm256_set1_epi16(16));
    return _mm256_setzero_si256();
}

template <int F>
inline __m256 kq_step(__m256 acc, __m256i isum, const KScales& w, const KAct& x) {
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), x.dx), w.wd, acc);
    if constexpr (has_mins<F>()) acc = _mm256_fmadd_ps(w.mw, x.sx, acc);
    return acc;
}

// Software prefetch of the group 16 rows ahead (one-row tiles read rows in turn; see prefetch_rows), with
// the weight streams' hint Q_HINT (per CPU vendor, build.py: into L2 on Intel, where the non-temporal hint
// held one core's stream to about two thirds of this rate).
template <int F>
inline void kq_prefetch(const uint8_t* p, int64_t row_bytes) {
    const uint8_t* q = p + 16 * row_bytes;
    for (int64_t o = 0; o < group_bytes<F>(); o += 64) _mm_prefetch((const char*)(q + o), Q_HINT);
    _mm_prefetch((const char*)(q + group_bytes<F>() - 1), Q_HINT);
}

#if LD_VNNI512
// ------------------------------------------------------------------ AVX-512: 64 weights per register

// Four registers of 16 int32 partial sums, each holding two sub-blocks (lanes 0-7: A_r, 8-15: B_r), to
// the 8 sub-block sums [A0, A1, A2, A3, B0, B1, B2, B3].
inline __m256i reduce4(__m512i r0, __m512i r1, __m512i r2, __m512i r3) {
    // per 128-bit lane: [r0, r1, r0, r1] and [r2, r3, r2, r3], then [r0, r1, r2, r3]
    const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(r0, r1), _mm512_unpackhi_epi32(r0, r1));
    const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(r2, r3), _mm512_unpackhi_epi32(r2, r3));
    const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
    const __m512i v = _mm512_shuffle_i64x2(u, u, _MM_SHUFFLE(3, 1, 2, 0));  // 128-bit lanes 0, 2, 1, 3
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

struct KWeights {
    __m512i u[4];    // unsigned quantized values, 64 a register
    __m512i scl[4];  // Q6_K: each 16-group's scale, per pair of int16 products
    int valid;       // Q5_0: blocks in this group
};

// Two Q5_0 blocks as 64 unsigned 5-bit values in element order (block b missing: zeros).
inline __m512i q5_0_pair(const uint8_t* a, const uint8_t* b) {
    const __m128i qa = _mm_loadu_si128((const __m128i*)(a + 6));
    const __m128i qb = b ? _mm_loadu_si128((const __m128i*)(b + 6)) : _mm_setzero_si128();
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_broadcastsi128_si256(qa)),
                                         _mm256_broadcastsi128_si256(qb), 1);  // [a, a, b, b]
    const __m512i nib = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)),
                                         _mm512_set1_epi8(0x0F));
    const uint64_t bits = (uint64_t)load_u32(a + 2) | (b ? (uint64_t)load_u32(b + 2) << 32 : 0);
    return _mm512_or_si512(nib, _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(0x10)));
}

template <int F>
inline KWeights kq_unpack(const uint8_t* p, int valid) {
    KWeights w;
    w.valid = valid;
    const __m512i low = _mm512_set1_epi8(0x0F);
    if constexpr (has_mins<F>()) {
        const uint8_t* qs = p + (F == Q4_K ? 16 : 48);
        LD_UNROLL for (int h = 0; h < 2; ++h) {  // registers (0|2, 1|3), then (4|6, 5|7)
            const __m512i raw = _mm512_loadu_si512(qs + 64 * h);
            w.u[2 * h] = _mm512_and_si512(raw, low);
            w.u[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        }
        if constexpr (F == Q5_K) {  // fifth bit j of byte l -> element l of sub-block j
            const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(p + 16)));
            const int sub[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
            LD_UNROLL for (int r = 0; r < 4; ++r) {
                const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << sub[r][0])),
                                                       _mm256_set1_epi8((char)(1 << sub[r][1])), 1);
                w.u[r] = _mm512_or_si512(
                    w.u[r], _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(qh, bit), _mm512_set1_epi8(0x10)));
            }
        }
    } else if constexpr (F == Q6_K) {
        const __m512i two = _mm512_set1_epi8(0x30);
        const __m128i sc8 = _mm_loadu_si128((const __m128i*)(p + 192));
        const __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(sc8));
        LD_UNROLL for (int h = 0; h < 2; ++h) {  // register 2h: sub-blocks 4h|4h+1, 2h+1: 4h+2|4h+3
            const __m512i ql = _mm512_loadu_si512(p + 64 * h);
            const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(p + 128 + 32 * h)));
            const __m512i hl = _mm512_and_si512(_mm512_sllv_epi64(qh, _mm512_setr_epi64(4, 4, 4, 4, 2, 2, 2, 2)), two);
            const __m512i hh = _mm512_and_si512(_mm512_srlv_epi64(qh, _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2)), two);
            w.u[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, low), hl);
            w.u[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low), hh);
        }
        alignas(64) static const int16_t group[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                      2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
        LD_UNROLL for (int r = 0; r < 4; ++r) {  // register r covers the 16-groups 4r..4r+3
            const __m512i idx = _mm512_add_epi16(_mm512_load_si512(group), _mm512_set1_epi16((short)(4 * r)));
            w.scl[r] = _mm512_permutexvar_epi16(idx, sc16);
        }
    } else {  // Q5_0: register r holds blocks 2r and 2r + 1
        LD_UNROLL for (int r = 0; r < 4; ++r) {
            if (2 * r >= valid) {
                w.u[r] = _mm512_setzero_si512();
                continue;
            }
            w.u[r] = q5_0_pair(p + 44 * r, 2 * r + 1 < valid ? p + 44 * r + 22 : nullptr);
        }
    }
    return w;
}

// The 8 sub-block sums of unsigned weights times the activations of one group (xq: its 256 bytes, in
// the layout kq_layout chose).
template <int F>
inline __m256i kq_dot(const KWeights& w, const int8_t* xq) {
    __m512i p[4];
    LD_UNROLL for (int r = 0; r < 4; ++r) {
        if (F == Q5_0 && 2 * r >= w.valid) {
            p[r] = _mm512_setzero_si512();
            continue;
        }
        const __m512i x = F == Q5_0 && 2 * r + 1 >= w.valid ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, xq + 64 * r)
                                                             : _mm512_loadu_si512(xq + 64 * r);
        if constexpr (F == Q6_K)
            p[r] = _mm512_madd_epi16(_mm512_maddubs_epi16(w.u[r], x), w.scl[r]);
        else
            p[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.u[r], x);
    }
    return reduce4(p[0], p[1], p[2], p[3]);
}

#else
// ------------------------------------------------------------------ AVX2: one sub-block per register

struct KWeights {
    const uint8_t* p;
    int valid;
};

template <int F>
inline KWeights kq_unpack(const uint8_t* p, int valid) {
    return {p, valid};
}

// Sub-block j's 32 unsigned values and its integer sum against x (int32, 8 partial lanes).
template <int F>
inline __m256i kq_sub(const uint8_t* p, int j, const int8_t* x) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i xv = _mm256_loadu_si256((const __m256i*)x);
    if constexpr (has_mins<F>()) {
        const __m256i raw = _mm256_loadu_si256((const __m256i*)(p + (F == Q4_K ? 16 : 48) + 32 * (j / 2)));
        __m256i u = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw, 4) : raw, low);
        if constexpr (F == Q5_K) {
            const __m256i qh = _mm256_loadu_si256((const __m256i*)(p + 16));
            const __m256i hb = j <= 4 ? _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - j))
                                      : _mm256_srl_epi16(qh, _mm_cvtsi32_si128(j - 4));
            u = _mm256_or_si256(u, _mm256_and_si256(hb, _mm256_set1_epi8(0x10)));
        }
        return _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), ones);
    } else if constexpr (F == Q6_K) {
        const int h = j / 4, jj = j % 4;
        const __m256i ql = _mm256_loadu_si256((const __m256i*)(p + 64 * h + 32 * (jj % 2)));
        const __m256i qh = _mm256_loadu_si256((const __m256i*)(p + 128 + 32 * h));
        const __m256i hb = jj < 3 ? _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - 2 * jj)) : _mm256_srli_epi16(qh, 2);
        const __m256i u = _mm256_or_si256(_mm256_and_si256(jj / 2 ? _mm256_srli_epi16(ql, 4) : ql, low),
                                          _mm256_and_si256(hb, _mm256_set1_epi8(0x30)));
        const int8_t* sc = (const int8_t*)(p + 192);
        const __m256i scl = _mm256_set_m128i(_mm_set1_epi16(sc[2 * j + 1]), _mm_set1_epi16(sc[2 * j]));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), scl);
    } else {  // Q5_0 block j
        const uint8_t* b = p + 22 * j;
        const __m128i qs = _mm_loadu_si128((const __m128i*)(b + 6));
        const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), low);
        const __m256i spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32((int)load_u32(b + 2)),
            _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
        const __m256i sel = _mm256_set1_epi64x((int64_t)0x8040201008040201ull);
        const __m256i hb = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel), _mm256_set1_epi8(0x10));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_or_si256(nib, hb), xv), ones);
    }
}

template <int F>
inline __m256i kq_dot(const KWeights& w, const int8_t* xq) {
    const int32_t* o = has_mins<F>() ? ORDER_K : ORDER_N;
    __m256i s[8];
    LD_UNROLL for (int i = 0; i < 8; ++i) {
        const int j = o[i];
        s[i] = F == Q5_0 && j >= w.valid ? _mm256_setzero_si256() : kq_sub<F>(w.p, j, xq + 32 * j);
    }
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}
#endif

// Q4_K and Q5_K activations in the AVX-512 build: each group's sub-blocks stored in the order
// 0, 2, 1, 3, 4, 6, 5, 7, so each 64 bytes meet the low or high nibbles of 64 weight bytes.
inline bool k_grouped(int fmt) { return LD_VNNI512 && (fmt == Q4_K || fmt == Q5_K); }

// One weight row n0 against rows m0..m0+MR-1 of int8 activations.
template <int F, int MR>
void tile_kq(const WQ& w, int64_t n0, const Inputs& in, int64_t m0, float* y, int64_t ldy) {
    const QAct& a = in.a;
    const uint8_t* row = w.qs + n0 * w.row_bytes;
    const int64_t groups = (w.nb + 7) / 8;
    __m256 acc[MR];
    LD_UNROLL for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t s = 0; s < groups; ++s) {
        const uint8_t* p = row + s * group_bytes<F>();
        const int valid = F == Q5_0 ? (int)std::min<int64_t>(8, w.nb - 8 * s) : 8;
        kq_prefetch<F>(p, w.row_bytes);
        const KScales ks = kq_scales<F>(p, valid);
        const KWeights kw = kq_unpack<F>(p, valid);
        LD_UNROLL for (int m = 0; m < MR; ++m) {
            const KAct kx = kq_act<F>(a, m0 + m, s);
            const __m256i isum = _mm256_sub_epi32(kq_dot<F>(kw, a.q + (m0 + m) * a.K + s * QKK), kq_offset<F>(ks, kx));
            acc[m] = kq_step<F>(acc[m], isum, ks, kx);
        }
    }
    LD_UNROLL for (int m = 0; m < MR; ++m) y[(m0 + m) * ldy + n0] = hsum8(acc[m]);
}

// ------------------------------------------------------------------ float32 activations

// The group's weights as float32, computed exactly as GGUF (gguf-py) dequantizes them.
template <int F>
void kq_dequant(const uint8_t* p, int valid, float* out) {
    if constexpr (has_mins<F>()) {
        uint64_t sc, mn;
        k_scales(p + 4, &sc, &mn);
        const float d = f16(load_u16(p)), dmin = f16(load_u16(p + 2));
        const uint8_t* qs = p + (F == Q4_K ? 16 : 48);
        for (int j = 0; j < 8; ++j) {
            const float A = d * (float)(uint8_t)(sc >> 8 * j), B = dmin * (float)(uint8_t)(mn >> 8 * j);
            for (int l = 0; l < 32; ++l) {
                int q = (qs[32 * (j / 2) + l] >> 4 * (j % 2)) & 0x0F;
                if (F == Q5_K) q |= ((p[16 + l] >> j) & 1) << 4;
                out[32 * j + l] = A * (float)q - B;
            }
        }
    } else if constexpr (F == Q6_K) {
        const float d = f16(load_u16(p + 208));
        const int8_t* sc = (const int8_t*)(p + 192);
        for (int e = 0; e < QKK; ++e) {
            const int h = e / 128, r = e % 128;
            const int lo = (p[64 * h + r % 64] >> 4 * (r / 64)) & 0x0F;
            const int hi = (p[128 + 32 * h + r % 32] >> 2 * (r / 32)) & 0x03;
            out[e] = (d * (float)sc[e / 16]) * (float)((lo | hi << 4) - 32);
        }
    } else {
        for (int j = 0; j < valid; ++j) {
            const uint8_t* b = p + 22 * j;
            const float d = f16(load_u16(b));
            const uint32_t qh = load_u32(b + 2);
            for (int l = 0; l < 16; ++l) {
                const int lo = (b[6 + l] & 0x0F) | ((qh >> l) & 1) << 4;
                const int hi = (b[6 + l] >> 4) | ((qh >> (l + 16)) & 1) << 4;
                out[32 * j + l] = d * (float)(lo - 16);
                out[32 * j + 16 + l] = d * (float)(hi - 16);
            }
        }
    }
}

template <int F, int MR>
void tile_kq_f32(const WQ& w, int64_t n0, const Inputs& in, int64_t m0, float* y, int64_t ldy) {
    const uint8_t* row = w.qs + n0 * w.row_bytes;
    const int64_t groups = (w.nb + 7) / 8;
    alignas(32) float wv[QKK];
    __m256 acc[MR];
    LD_UNROLL for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t s = 0; s < groups; ++s) {
        const int valid = F == Q5_0 ? (int)std::min<int64_t>(8, w.nb - 8 * s) : 8;
        kq_dequant<F>(row + s * group_bytes<F>(), valid, wv);
        for (int k = 0; k < valid * QK; k += 8) {
            const __m256 v = _mm256_load_ps(wv + k);
            LD_UNROLL for (int m = 0; m < MR; ++m)
                acc[m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(in.x + (m0 + m) * in.ldx + s * QKK + k), acc[m]);
        }
    }
    LD_UNROLL for (int m = 0; m < MR; ++m) y[(m0 + m) * ldy + n0] = hsum8(acc[m]);
}

#define LD_KROW(FN, F) {FN<F, 1>, FN<F, 2>, FN<F, 3>, FN<F, 4>, FN<F, 5>, FN<F, 6>, FN<F, 7>, FN<F, 8>}
#define LD_KTABLE(FN, F) {LD_KROW(FN, F), {}, {}, {}}  // one weight row per tile

const TileFn T_KQ_Q8[4][MAXN][MAXM] = {LD_KTABLE(tile_kq, Q4_K), LD_KTABLE(tile_kq, Q5_K), LD_KTABLE(tile_kq, Q6_K),
                                       LD_KTABLE(tile_kq, Q5_0)};
const TileFn T_KQ_F32[4][MAXN][MAXM] = {LD_KTABLE(tile_kq_f32, Q4_K), LD_KTABLE(tile_kq_f32, Q5_K),
                                        LD_KTABLE(tile_kq_f32, Q6_K), LD_KTABLE(tile_kq_f32, Q5_0)};

inline int kq_index(int fmt) { return fmt == Q4_K ? 0 : fmt == Q5_K ? 1 : fmt == Q6_K ? 2 : 3; }

}  // namespace
