// int8-activation tiles for CPUs with AVX-512 VNNI (included by native.cpp in its AVX-512 build).
//
// vpdpbusd multiplies 64 unsigned weight bytes by 64 signed activation bytes and sums each group of
// four products exactly in int32. Q4_1 takes 4 blocks at a time: the low nibbles of 64 weight bytes
// (first halves of 4 blocks) and the high nibbles (second halves) against activations stored in the
// matching grouped order, so lanes 4i..4i+3 hold block b + i. Remaining blocks (and Q8_0) go two at a
// time (lanes 0-7: block b, 8-15: block b + 1), then a last odd block in the low 8 lanes. As in the
// AVX2 tiles, each block's integer sum is scaled by d_x and d_w and accumulated per lane; every output
// row sees the same operations whatever the tile shape, so outputs stay row-invariant.
#pragma once

namespace {

inline float hsum16(__m512 v) {
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

inline __m512 pair_scale(const float* s0, const float* s1) {  // [*s0 x 8, *s1 x 8]
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcast_ss(s0)), _mm256_broadcast_ss(s1), 1);
}

// Two Q4_1 blocks (32 bytes) -> 64 bytes of 4-bit values in element order: [b lo, b hi, b+1 lo, b+1 hi].
inline __m512i unpack_q4_pair(const uint8_t* p) {
    const __m512i dup = _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3);
    const __m512i shift = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4);
    const __m512i v = _mm512_permutexvar_epi64(dup, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)p)));
    return _mm512_and_si512(_mm512_srlv_epi64(v, shift), _mm512_set1_epi8(0x0F));
}

inline __m256i unpack_q4(const uint8_t* p) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}

// Software prefetch 8 rows ahead (two 4-row tiles; with one-row tiles, for one token, 8 tiles), one line
// per row per step: the quantized rows are short, so a tile is over before the hardware prefetcher gets
// far. Measured with 2 chunks per thread, one row of activations: Q4_1 layers of the bundled model
// 1.5-1.8x faster, Q8_0 layers of a 0.5B model 1.4x; 16 rows ahead gave the same as 8. Into L2 (hint
// T1), not non-temporal: on a Xeon with a non-inclusive L2 the non-temporal hint held one core's weight
// stream at about two thirds of this rate (benchmarks/kernels.py --layer).
template <int NR>
inline void prefetch_rows(const WQ& w, int64_t n0, int64_t b, int64_t block_bytes) {
    LD_UNROLL for (int n = 0; n < NR; ++n)
        _mm_prefetch((const char*)(w.qs + ((n0 + n + 8) * w.nb + b) * block_bytes), Q_HINT);
}

template <int NR, int MR, bool Q4>
void tile_vnni(const WQ& w, int64_t n0, const QAct& a, int64_t m0, float* y, int64_t ldy) {
    const int64_t nb = w.nb, nbp = w.nbp, wbytes = Q4 ? 16 : QK;
    const __m512i flip = _mm512_set1_epi8((char)0x80);  // Q8_0: w + 128 as unsigned bytes
    __m512 acc[NR][MR];
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m) acc[n][m] = _mm512_setzero_ps();
    alignas(32) float ds[NR][8];
    int64_t b = 0;
    if (Q4) {  // runs of 4 blocks: 64 bytes of nibbles against 2 x 64 activations (grouped layout)
        const __m512i low = _mm512_set1_epi8(0x0F);
        for (; b + 4 <= nb; b += 4) {
            if (b % 8 == 0) load_scales<NR>(w, n0, b, ds);
            const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            const __m512i idx = _mm512_add_epi32(sel, _mm512_set1_epi32((int)(b % 8)));
            prefetch_rows<NR>(w, n0, b, 16);
            __m512i lo[NR], hi[NR];
            __m512 wd[NR];
            LD_UNROLL for (int n = 0; n < NR; ++n) {
                const __m512i raw = _mm512_loadu_si512(w.qs + ((n0 + n) * nb + b) * 16);
                lo[n] = _mm512_and_si512(raw, low);
                hi[n] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
                wd[n] = _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(_mm256_load_ps(ds[n])));
            }
            LD_UNROLL for (int m = 0; m < MR; ++m) {
                const int8_t* xq = a.q + (m0 + m) * a.K + b * QK;
                const __m512i xlo = _mm512_loadu_si512(xq), xhi = _mm512_loadu_si512(xq + 64);
                const __m512 xd = _mm512_permutexvar_ps(
                    idx, _mm512_castps256_ps512(_mm256_loadu_ps(a.d + (m0 + m) * nbp + (b & ~int64_t(7)))));
                LD_UNROLL for (int n = 0; n < NR; ++n) {
                    const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[n], xlo),
                                                          hi[n], xhi);  // lanes 4i..4i+3: block b + i
                    acc[n][m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(p), xd), wd[n], acc[n][m]);
                }
            }
        }
    }
    for (; b + 2 <= nb; b += 2) {
        if (b % 8 == 0) load_scales<NR>(w, n0, b, ds);
        prefetch_rows<NR>(w, n0, b, wbytes);
        __m512i wq[NR];
        __m512 wd[NR];
        LD_UNROLL for (int n = 0; n < NR; ++n) {
            const uint8_t* p = w.qs + ((n0 + n) * nb + b) * wbytes;
            wq[n] = Q4 ? unpack_q4_pair(p) : _mm512_xor_si512(_mm512_loadu_si512(p), flip);
            wd[n] = pair_scale(&ds[n][b % 8], &ds[n][b % 8 + 1]);
        }
        LD_UNROLL for (int m = 0; m < MR; ++m) {
            const __m512i xq = _mm512_loadu_si512(a.q + (m0 + m) * a.K + b * QK);
            const float* dx = a.d + (m0 + m) * nbp + b;
            const __m512 xd = pair_scale(dx, dx + 1);
            // Q8_0: start from -128 * (sum of each group of four x) so the offset of w cancels exactly
            const __m512i base = Q4 ? _mm512_setzero_si512()
                                    : _mm512_sub_epi32(_mm512_setzero_si512(),
                                                       _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, xq));
            LD_UNROLL for (int n = 0; n < NR; ++n) {
                const __m512i p = _mm512_dpbusd_epi32(base, wq[n], xq);
                acc[n][m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(p), xd), wd[n], acc[n][m]);
            }
        }
    }
    if (b < nb) {  // an odd last block, in lanes 0-7
        if (b % 8 == 0) load_scales<NR>(w, n0, b, ds);
        const __m256i flip8 = _mm256_set1_epi8((char)0x80);
        LD_UNROLL for (int n = 0; n < NR; ++n) {
            const uint8_t* p = w.qs + ((n0 + n) * nb + b) * wbytes;
            const __m256i wq = Q4 ? unpack_q4(p) : _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)p), flip8);
            const __m256 wd = _mm256_broadcast_ss(&ds[n][b % 8]);
            LD_UNROLL for (int m = 0; m < MR; ++m) {
                const __m256i xq = _mm256_loadu_si256((const __m256i*)(a.q + (m0 + m) * a.K + b * QK));
                const __m256 xd = _mm256_broadcast_ss(a.d + (m0 + m) * nbp + b);
                const __m256i base = Q4 ? _mm256_setzero_si256()
                                        : _mm256_sub_epi32(_mm256_setzero_si256(),
                                                           _mm256_dpbusd_epi32(_mm256_setzero_si256(), flip8, xq));
                const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(base, wq, xq)), xd);
                acc[n][m] = _mm512_fmadd_ps(_mm512_zextps256_ps512(t), _mm512_zextps256_ps512(wd), acc[n][m]);
            }
        }
    }
    __m256 am[NR][MR];  // Q4_1: sum over blocks of min * d_x * sum(q_x); Q8_0: zero
    if (Q4) {
        min_terms<NR, MR>(w, n0, a, m0, am);
    } else {
        LD_UNROLL for (int n = 0; n < NR; ++n)
            LD_UNROLL for (int m = 0; m < MR; ++m) am[n][m] = _mm256_setzero_ps();
    }
    LD_UNROLL for (int n = 0; n < NR; ++n)
        LD_UNROLL for (int m = 0; m < MR; ++m)
            y[(m0 + m) * ldy + n0 + n] = hsum16(_mm512_add_ps(acc[n][m], _mm512_zextps256_ps512(am[n][m])));
}

template <int NR, int MR>
void tile_q41_q8(const WQ& w, int64_t n0, const QAct& a, int64_t m0, float* y, int64_t ldy) {
    tile_vnni<NR, MR, true>(w, n0, a, m0, y, ldy);
}

template <int NR, int MR>
void tile_q80_q8(const WQ& w, int64_t n0, const QAct& a, int64_t m0, float* y, int64_t ldy) {
    tile_vnni<NR, MR, false>(w, n0, a, m0, y, ldy);
}

}  // namespace
