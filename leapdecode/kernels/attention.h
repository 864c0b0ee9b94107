// Row-invariant attention (included by native.cpp).
//
// One query row attends to the keys its mask allows, taken in slot order as one compacted sequence:
// every reduction (scores, max, sum of exponentials, weighted sum of values) depends only on that
// sequence, so a draft node sees exactly the arithmetic of the same token decoded alone, whether its
// keys sit in consecutive slots (a chain) or between sibling branches (a tree).
//
// A row's keys are taken in blocks (at most 4, split by the row's number of keys alone) whose partial
// sums are merged in block order, so a one-token step can spread over the threads by blocks as well as by
// heads: for a single row each task takes one block against every query head of one key/value head;
// for several rows (drafts, prefill) each task takes one row and every block for the query heads of one
// key/value head. Both give every row the same operations. Measured on the bundled model (9 query heads,
// 3 key/value heads, head_dim 64) after 800 cached tokens, against one task per query head over all keys:
// one-token attention 0.85x the time, 7 rows 1.03x; decoding a 770-token prompt 0.95-0.97x the time.
//
// The AVX-512 build then takes the query heads of a key/value head together (`attend_block_heads`): two
// heads' sums for a key in one register, and the values weighed for up to 3 (head_dim 128) or 6 (64)
// heads per read of a value row. A long prefill was bound by re-reading the keys and values once per
// query head. Against one head at a time (one call, builds alternating): a 700-token prefill of the 1.5B
// Qwen (12 and 2 heads, 128) 0.52x the time, 2000 tokens 0.49x, the 0.5B (14 and 2, 64) 0.66x; 7 rows
// after 300 keys 0.57x; one row after 700-800 keys 0.66x (1.5B), 0.75x (0.5B), 0.88x (bundled).
//
// Keys and values are float32, or int8 with one float32 scale per token of each head (LD_KV_INT8, a
// quarter of the bytes to read at long context). int8 rows are converted to float exactly as they are
// loaded; a key's scale multiplies its score (the dot product of the query with the key's int8 values),
// a value's scale its softmax weight, so every row keeps one fixed order of operations as with float32.

#pragma once

namespace {

inline __m256 exp256(__m256 x) {  // Cephes-style exp for x <= 0, relative error about 2e-7
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// 8 (16) keys' or values' elements as floats: float32 as stored, int8 converted exactly.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#if LD_VNNI512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#endif

// Software prefetch of the `count` key or value rows named by idx (every line of each row's D elements)
// into L1; callers name rows some way ahead of the ones they read. A row's keys and values are read once
// per step, a few kilobytes per task, too short a stream for the hardware prefetcher to get ahead.
template <class T>
inline void prefetch_kv(const T* base, const int32_t* idx, int64_t count, int64_t stride, int64_t D) {
    for (int64_t r = 0; r < count; ++r)
        for (int64_t o = 0; o < D * (int64_t)sizeof(T); o += 64)
            _mm_prefetch((const char*)(base + idx[r] * stride) + o, _MM_HINT_T0);
}

// The weight of value row t: p, times the row's scale when the values are int8 (`vs`).
template <class T>
inline float value_weight(float p, const float* vs, int32_t t) {
    if constexpr (std::is_same_v<T, int8_t>) return p * vs[t];
    else return p;
}

template <class T>
inline float dot(const float* a, const T* b, int64_t D) {  // D % 8 == 0
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), load8(b));
    for (int64_t c = 8; c < D; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), load8(b + c), acc);
    return hsum8(acc);
}

// Scores of 8 keys at once, each exactly as `dot` computes it (8 independent chains of multiply-adds
// instead of one after another). Measured against one key at a time, outputs bit-identical: 0.95x the
// time for one query after 700 keys at head_dim 64, 0.88x at 128, 0.92x for 7 queries, 0.96x for a
// 700-token prefill (the CPU already overlapped most of the separate chains).
template <class T>
inline void dot8(const float* q, const T* k, const int32_t* idx, int64_t kstride, int64_t D, float* out) {
    __m256 acc[8];
    const __m256 q0 = _mm256_loadu_ps(q);
    LD_UNROLL for (int r = 0; r < 8; ++r) acc[r] = _mm256_mul_ps(q0, load8(k + idx[r] * kstride));
    for (int64_t c = 8; c < D; c += 8) {
        const __m256 qc = _mm256_loadu_ps(q + c);
        LD_UNROLL for (int r = 0; r < 8; ++r)
            acc[r] = _mm256_fmadd_ps(qc, load8(k + idx[r] * kstride + c), acc[r]);
    }
    LD_UNROLL for (int r = 0; r < 8; ++r) out[r] = hsum8(acc[r]);
}

struct AttnArgs {
    const float* q;
    const void *k, *v;  // float, or int8 (kv_fmt)
    float* out;
    int64_t B, H, Hkv, S, T, D;
    const int64_t *qst, *kst, *vst, *ost;  // strides of dims (batch, head, row); the last dim is contiguous
    const uint8_t* mask;                    // [S, T] (row stride mask_stride), or null for causal
    int64_t mask_stride;
    float scale;
    int64_t kv_fmt = LD_KV_F32;
    const float *ks = nullptr, *vs = nullptr;  // int8: scales [B, Hkv, T], strides sst (batch, head; rows 1)
    int64_t sst[2] = {0, 0};
};

// o = inv * sum_j p[j] v[idx[j]]: each output element accumulates its products in j order, so the vector
// width (16 columns at a time with AVX-512, else 8) never changes a bit of it.
template <class T>
inline void weighted_values(const T* v, int64_t vstride, const float* vs, const int32_t* idx, const float* p,
                            int64_t n, int64_t D, float inv, float* o) {
#if LD_VNNI512
    if (D % 16 == 0) {
        __m512 acc[16];  // D <= 256
        const int64_t C = D / 16;
        for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
            const __m512 pj = _mm512_set1_ps(value_weight<T>(p[j], vs, idx[j]));
            const T* vr = v + idx[j] * vstride;
            for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(pj, load16(vr + 16 * c), acc[c]);
        }
        for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
        return;
    }
#endif
    __m256 acc[32];  // D <= 256
    const int64_t C = D / 8;
    for (int64_t c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(value_weight<T>(p[j], vs, idx[j]));
        const T* vr = v + idx[j] * vstride;
        for (int64_t c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(pj, load8(vr + 8 * c), acc[c]);
    }
    for (int64_t c = 0; c < C; ++c) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}

// The keys a row attends to, in slot order (its compacted sequence); returns how many.
inline int64_t row_keys(const AttnArgs& a, int64_t i, int32_t* idx) {
    int64_t n = 0;
    if (a.mask) {
        const uint8_t* mrow = a.mask + i * a.mask_stride;
        for (int64_t t = 0; t < a.T; ++t)
            if (mrow[t]) idx[n++] = (int32_t)t;
    } else {
        for (int64_t t = 0; t <= a.T - a.S + i; ++t) idx[n++] = (int32_t)t;
    }
    return n;
}

// A row's n keys are split into at most kMaxBlocks blocks of `key_block(n)` keys (a multiple of 8), so
// that one decoding row spreads over the threads by key blocks as well as by heads; the split depends on
// n alone, so a draft node and the same token decoded alone still share every operation.
constexpr int64_t kMaxBlocks = 4, kMinBlock = 64;
inline int64_t key_block(int64_t n) {
    const int64_t quarter = ((n + kMaxBlocks - 1) / kMaxBlocks + 7) / 8 * 8;
    return quarter > kMinBlock ? quarter : kMinBlock;
}
inline int64_t key_blocks(int64_t n) { return n == 0 ? 0 : (n + key_block(n) - 1) / key_block(n); }

// One block of keys [j0, j1) of idx for query q: scores, their max m, exponentials, their sum l, and
// part = sum_j exp(s_j - m) v_j. `p` has room for the block padded to 8.
// The scores p[0, m) (scaled in place to exponentials) -> part[0] = their max, part[1] = the sum of the
// exponentials.
inline void softmax_part(float* p, int64_t m, float scale, float* part) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < m; ++j) {
        p[j] *= scale;
        mx = p[j] > mx ? p[j] : mx;
    }
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 lsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < m; j += 8) {  // p has room for a padded last chunk
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), vmx));
        if (m - j < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(tail_mask(m - j)));
        _mm256_storeu_ps(p + j, e);
        lsum = _mm256_add_ps(lsum, e);
    }
    part[0] = mx;
    part[1] = hsum8(lsum);
}

// int8 keys: each score (the dot product with the key's int8 values) times the key's scale.
template <class T>
inline void scale_scores(float* p, const float* ks, const int32_t* idx, int64_t m) {
    if constexpr (std::is_same_v<T, int8_t>)
        for (int64_t j = 0; j < m; ++j) p[j] *= ks[idx[j]];
}

template <class T>
void attend_block(const AttnArgs& a, const float* q, const T* k, const T* v, const float* ks, const float* vs,
                  const int32_t* idx, int64_t j0, int64_t j1, float* p, float* part) {
    const int64_t D = a.D, m = j1 - j0;
    int64_t j8 = 0;
    for (; j8 + 8 <= m; j8 += 8) dot8(q, k, idx + j0 + j8, a.kst[2], D, p + j8);
    for (int64_t j = j8; j < m; ++j) p[j] = dot(q, k + idx[j0 + j] * a.kst[2], D);
    scale_scores<T>(p, ks, idx + j0, m);
    softmax_part(p, m, a.scale, part);
    weighted_values(v, a.vst[2], vs, idx + j0, p, m, D, 1.0f, part + 2);
}

#if LD_VNNI512
// The query heads of one key/value head, several at a time, so each key and value row is read once for
// them instead of once per head (a long prefill was bound by those reads). Every score, exponential and
// weighted sum keeps the operations of `attend_block`, so outputs are bit-identical to it.
constexpr int kPairs = 3;  // head pairs per pass of scores: 3 x 8 keys = 24 accumulators

// Scores of 8 keys for NP pairs of heads: a 512-bit register holds one key's 8-lane sums for both heads
// of a pair (`qp`: the pair's queries side by side, [D/8][16]) against the key's 8 values broadcast to
// both halves; each half is `dot8`'s register for that head and key.
template <int NP, class T>
inline void dot8_pairs(const float* qp, const T* k, const int32_t* idx, int64_t kstride, int64_t D,
                       float* const* out, int64_t j) {  // scores of keys idx[0..8) into out[h][j..j+8)
    __m512 acc[NP][8];
    LD_UNROLL for (int r = 0; r < 8; ++r) {
        const __m512 kv = _mm512_broadcast_f32x8(load8(k + idx[r] * kstride));
        LD_UNROLL for (int p = 0; p < NP; ++p) acc[p][r] = _mm512_mul_ps(_mm512_load_ps(qp + p * 2 * D), kv);
    }
    for (int64_t c = 8; c < D; c += 8) {
        __m512 qv[NP];
        LD_UNROLL for (int p = 0; p < NP; ++p) qv[p] = _mm512_load_ps(qp + p * 2 * D + 2 * c);
        LD_UNROLL for (int r = 0; r < 8; ++r) {
            const __m512 kv = _mm512_broadcast_f32x8(load8(k + idx[r] * kstride + c));
            LD_UNROLL for (int p = 0; p < NP; ++p) acc[p][r] = _mm512_fmadd_ps(qv[p], kv, acc[p][r]);
        }
    }
    LD_UNROLL for (int p = 0; p < NP; ++p)
        LD_UNROLL for (int r = 0; r < 8; ++r) {
            out[2 * p][j + r] = hsum8(_mm512_castps512_ps256(acc[p][r]));
            out[2 * p + 1][j + r] = hsum8(_mm512_extractf32x8_ps(acc[p][r], 1));
        }
}

// part_h + 2 = sum_j p_h[j] v[idx[j]] for NH heads reading each value row once; each element sums in j
// order from zero, as `weighted_values` does (its factor 1.0f is exact, so it is left out here).
template <int NH, int C, class T>
inline void weighted_values_heads(const T* v, int64_t vstride, const float* vs, const int32_t* idx,
                                  float* const* p, int64_t n, float* const* part) {
    __m512 acc[NH][C];
    LD_UNROLL for (int h = 0; h < NH; ++h) LD_UNROLL for (int c = 0; c < C; ++c) acc[h][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
        const T* vr = v + idx[j] * vstride;
        if (j + 8 < n) prefetch_kv(v, idx + j + 8, 1, vstride, 16 * C);
        __m512 pj[NH];
        LD_UNROLL for (int h = 0; h < NH; ++h) pj[h] = _mm512_set1_ps(value_weight<T>(p[h][j], vs, idx[j]));
        LD_UNROLL for (int c = 0; c < C; ++c) {
            const __m512 vc = load16(vr + 16 * c);
            LD_UNROLL for (int h = 0; h < NH; ++h) acc[h][c] = _mm512_fmadd_ps(pj[h], vc, acc[h][c]);
        }
    }
    LD_UNROLL for (int h = 0; h < NH; ++h) LD_UNROLL for (int c = 0; c < C; ++c) _mm512_storeu_ps(part[h] + 2 + 16 * c, acc[h][c]);
}

// Heads [0, nh) of `part`/`p` (nh <= 3 for head_dim 128, <= 6 for 64), C = D / 16.
template <int C, class T>
void values_heads(const T* v, int64_t vstride, const float* vs, const int32_t* idx, float* const* p, int64_t n,
                  int nh, float* const* part) {
    constexpr int most = C == 8 ? 3 : 6;
    for (int h0 = 0; h0 < nh; h0 += most) {
        switch (nh - h0 < most ? nh - h0 : most) {
            case 1: weighted_values_heads<1, C>(v, vstride, vs, idx, p + h0, n, part + h0); break;
            case 2: weighted_values_heads<2, C>(v, vstride, vs, idx, p + h0, n, part + h0); break;
            case 3: weighted_values_heads<3, C>(v, vstride, vs, idx, p + h0, n, part + h0); break;
            case 4: weighted_values_heads<4, C>(v, vstride, vs, idx, p + h0, n, part + h0); break;
            case 5: weighted_values_heads<5, C>(v, vstride, vs, idx, p + h0, n, part + h0); break;
            default: weighted_values_heads<6, C>(v, vstride, vs, idx, p + h0, n, part + h0); break;
        }
    }
}

// Keys [j0, j1) of idx for the G <= 2 * kPairs query heads `q[h]` of one key/value head: scores into
// p[h], then each head's softmax part and weighted values into part[h].
template <class T>
void attend_block_heads(const AttnArgs& a, const float* const* q, int G, const T* k, const T* v, const float* ks,
                        const float* vs, const int32_t* idx, int64_t j0, int64_t j1, float* const* p,
                        float* const* part) {
    const int64_t D = a.D, m = j1 - j0, m8 = m / 8 * 8;
    const int np = (G + 1) / 2;
    alignas(64) float qp[kPairs * 2 * 256];  // pair pr: its two heads' queries side by side, [D/8][16]
    float* out[2 * kPairs];
    for (int pr = 0; pr < np; ++pr) {  // an odd last head is paired with itself
        const int h1 = 2 * pr + 1 < G ? 2 * pr + 1 : 2 * pr;
        out[2 * pr] = p[2 * pr];
        out[2 * pr + 1] = p[h1];
        for (int64_t c = 0; c < D; c += 8) {
            _mm256_store_ps(qp + pr * 2 * D + 2 * c, _mm256_loadu_ps(q[2 * pr] + c));
            _mm256_store_ps(qp + pr * 2 * D + 2 * c + 8, _mm256_loadu_ps(q[h1] + c));
        }
    }
    for (int64_t j = 0; j < m8; j += 8) {
        if (j + 16 < m) prefetch_kv(k, idx + j0 + j + 16, m - j - 16 < 8 ? m - j - 16 : 8, a.kst[2], D);
        if (np == 3) dot8_pairs<3>(qp, k, idx + j0 + j, a.kst[2], D, out, j);
        else if (np == 2) dot8_pairs<2>(qp, k, idx + j0 + j, a.kst[2], D, out, j);
        else dot8_pairs<1>(qp, k, idx + j0 + j, a.kst[2], D, out, j);
    }
    for (int h = 0; h < G; ++h)
        for (int64_t j = m8; j < m; ++j) p[h][j] = dot(q[h], k + idx[j0 + j] * a.kst[2], D);
    for (int h = 0; h < G; ++h) scale_scores<T>(p[h], ks, idx + j0, m);
    for (int h = 0; h < G; ++h) softmax_part(p[h], m, a.scale, part[h]);
    if (D == 128) return values_heads<8>(v, a.vst[2], vs, idx + j0, p, m, G, part);
    if (D == 64) return values_heads<4>(v, a.vst[2], vs, idx + j0, p, m, G, part);
    for (int h = 0; h < G; ++h) weighted_values(v, a.vst[2], vs, idx + j0, p[h], m, D, 1.0f, part[h] + 2);
}
#endif

struct AttnJob {
    AttnArgs a;
    int64_t room;     // floats of scores per worker and query head
    int32_t* idx;     // per worker: room ints
    float* p;         // per worker: G * room floats
    float* parts;     // [B, S, H, kMaxBlocks, 2 + D]: max, sum of exponentials, weighted values
    int64_t* blocks;  // [B, S]: key blocks of each row
};

// Key/value head g of batch b: its keys and values as stored, and (int8) their scales.
template <class T>
inline const T* keys_of(const AttnArgs& a, int64_t b, int64_t g) {
    return (const T*)a.k + b * a.kst[0] + g * a.kst[1];
}
template <class T>
inline const T* values_of(const AttnArgs& a, int64_t b, int64_t g) {
    return (const T*)a.v + b * a.vst[0] + g * a.vst[1];
}
inline const float* key_scales(const AttnArgs& a, int64_t b, int64_t g) {
    return a.ks ? a.ks + b * a.sst[0] + g * a.sst[1] : nullptr;
}
inline const float* value_scales(const AttnArgs& a, int64_t b, int64_t g) {
    return a.vs ? a.vs + b * a.sst[0] + g * a.sst[1] : nullptr;
}

inline float* part_of(const AttnJob& j, int64_t b, int64_t i, int64_t h, int64_t c) {
    return j.parts + (((b * j.a.S + i) * j.a.H + h) * kMaxBlocks + c) * (2 + j.a.D);
}

// The output of row i, query head h, from its nb blocks' parts: none gives zeros; one, its values times
// the inverse sum (as a single pass over the keys computes them); several, the parts rescaled to the
// largest max and summed in block order.
void finish_row(const AttnJob& j, int64_t b, int64_t i, int64_t h, int64_t nb) {
    const AttnArgs& a = j.a;
    float* o = a.out + b * a.ost[0] + h * a.ost[1] + i * a.ost[2];
    if (nb == 0) {
        for (int64_t d = 0; d < a.D; ++d) o[d] = 0.0f;
        return;
    }
    const float* part[kMaxBlocks];
    float mx = -INFINITY, f[kMaxBlocks], l = 0.0f;
    for (int64_t c = 0; c < nb; ++c) {
        part[c] = part_of(j, b, i, h, c);
        mx = part[c][0] > mx ? part[c][0] : mx;
    }
    if (nb == 1) {
        const __m256 inv = _mm256_set1_ps(1.0f / part[0][1]);
        for (int64_t d = 0; d < a.D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(part[0] + 2 + d), inv));
        return;
    }
    for (int64_t c = 0; c < nb; ++c) {
        f[c] = expf(part[c][0] - mx);
        l += f[c] * part[c][1];
    }
    const __m256 inv = _mm256_set1_ps(1.0f / l);
    for (int64_t d = 0; d < a.D; d += 8) {  // D % 8 == 0; each element sums its blocks in order
        __m256 acc = _mm256_setzero_ps();
        for (int64_t c = 0; c < nb; ++c)
            acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(f[c]), _mm256_loadu_ps(part[c] + 2 + d)));
        _mm256_storeu_ps(o + d, _mm256_mul_ps(acc, inv));
    }
}

// Block c of the keys in idx (n of them) for query head h of row i, into its part.
template <class T>
inline void block_of_row(const AttnJob& j, int64_t b, int64_t h, int64_t i, const int32_t* idx, int64_t n,
                         int64_t c, float* p) {
    const AttnArgs& a = j.a;
    const int64_t g = h / (a.H / a.Hkv), kb = key_block(n), j0 = c * kb, j1 = j0 + kb < n ? j0 + kb : n;
    attend_block(a, a.q + b * a.qst[0] + h * a.qst[1] + i * a.qst[2], keys_of<T>(a, b, g), values_of<T>(a, b, g),
                 key_scales(a, b, g), value_scales(a, b, g), idx, j0, j1, p, part_of(j, b, i, h, c));
}

// Block c of the n keys in idx for every query head of key/value head g in row i, into their parts; `p`
// holds room for each head's scores.
template <class T>
void group_block_as(const AttnJob& j, int64_t b, int64_t g, int64_t i, const int32_t* idx, int64_t n, int64_t c,
                    float* p) {
    const AttnArgs& a = j.a;
    const int64_t G = a.H / a.Hkv;
#if LD_VNNI512
    constexpr int most = 2 * kPairs;
    const int64_t kb = key_block(n), j0 = c * kb, j1 = j0 + kb < n ? j0 + kb : n;
    const T *k = keys_of<T>(a, b, g), *v = values_of<T>(a, b, g);
    const float *ks = key_scales(a, b, g), *vs = value_scales(a, b, g);
    for (int64_t h0 = 0; h0 < G; h0 += most) {
        const int nh = (int)(G - h0 < most ? G - h0 : most);
        const float* q[most];
        float *ps[most], *parts[most];
        for (int t = 0; t < nh; ++t) {
            const int64_t h = g * G + h0 + t;
            q[t] = a.q + b * a.qst[0] + h * a.qst[1] + i * a.qst[2];
            ps[t] = p + (h0 + t) * j.room;
            parts[t] = part_of(j, b, i, h, c);
        }
        attend_block_heads(a, q, nh, k, v, ks, vs, idx, j0, j1, ps, parts);
    }
#else
    for (int64_t h = g * G; h < (g + 1) * G; ++h) block_of_row<T>(j, b, h, i, idx, n, c, p);
#endif
}

inline void group_block(const AttnJob& j, int64_t b, int64_t g, int64_t i, const int32_t* idx, int64_t n,
                        int64_t c, float* p) {
    if (j.a.kv_fmt == LD_KV_INT8) group_block_as<int8_t>(j, b, g, i, idx, n, c, p);
    else group_block_as<float>(j, b, g, i, idx, n, c, p);
}

// One row (several rows per call: draft verification, prefill). Task (b, g, i): every block of the row for
// the query heads of key/value head g, then their outputs.
void attn_row_task(void* ctx, int64_t task, int worker) {
    const AttnJob& j = *(const AttnJob*)ctx;
    const AttnArgs& a = j.a;
    const int64_t i = task % a.S, g = task / a.S % a.Hkv, b = task / (a.S * a.Hkv), G = a.H / a.Hkv;
    int32_t* idx = j.idx + worker * j.room;
    const int64_t n = row_keys(a, i, idx), nb = key_blocks(n);
    for (int64_t c = 0; c < nb; ++c) group_block(j, b, g, i, idx, n, c, j.p + worker * G * j.room);
    for (int64_t h = g * G; h < (g + 1) * G; ++h) finish_row(j, b, i, h, nb);
}

// A single row (a decoding step), where one task per query head leaves a thread idle for much of a long
// context. Task (g, c): block c of the keys against every query head of key/value head g, so each key
// and value row is read once for the group; the rows' outputs follow in `attn_finish_task`.
void attn_group_task(void* ctx, int64_t task, int worker) {
    const AttnJob& j = *(const AttnJob*)ctx;
    const AttnArgs& a = j.a;
    const int64_t c = task % kMaxBlocks, g = task / kMaxBlocks % a.Hkv, b = task / (kMaxBlocks * a.Hkv);
    const int64_t G = a.H / a.Hkv;
    int32_t* idx = j.idx + worker * j.room;
    const int64_t n = row_keys(a, 0, idx), nb = key_blocks(n);
    if (c == 0 && g == 0) j.blocks[b] = nb;
    if (c >= nb) return;
    group_block(j, b, g, 0, idx, n, c, j.p + worker * G * j.room);
}

void attn_finish_task(void* ctx, int64_t task, int) {
    const AttnJob& j = *(const AttnJob*)ctx;
    finish_row(j, task / j.a.H, 0, task % j.a.H, j.blocks[task / j.a.H]);
}

LdStatus check_attention(int64_t H, int64_t Hkv, int64_t D) {
    if (D % 8 != 0 || D > 256) return LD_ERR_HEAD_DIM;
    if (Hkv <= 0 || H % Hkv != 0) return LD_ERR_KV_HEADS;
    return LD_OK;
}

// Threads attention uses for these sizes.
inline int attention_threads(const AttnArgs& a, int threads) {
    return a.B * a.H * a.S * a.T * a.D < (1 << 15) ? 1 : threads;
}

// Scratch per thread: compacted key indices (ints) and, per query head of a group, scores (floats),
// each with room for a padded chunk of 8.
inline int64_t attention_room(int64_t T) { return T + 8; }
inline size_t attention_scratch_bytes(int64_t T, int64_t G, int threads) {
    return (size_t)attention_room(T) * (sizeof(int32_t) + G * sizeof(float)) * threads;
}

// Runs attention with `scratch` of attention_scratch_bytes(a.T, a.H / a.Hkv, nt); returns LD_OK or
// LD_ERR_NO_MEMORY (for the blocks' parts).
LdStatus attention(const AttnArgs& a, int nt, void* scratch) {
    const int64_t G = a.H / a.Hkv, room = attention_room(a.T), rows = a.B * a.S;
    float* parts = (float*)malloc(sizeof(float) * rows * a.H * kMaxBlocks * (2 + a.D) + sizeof(int64_t) * rows);
    if (!parts) return LD_ERR_NO_MEMORY;
    int32_t* idx = (int32_t*)scratch;
    AttnJob j{a, room, idx, (float*)(idx + room * nt), parts,
              (int64_t*)(parts + rows * a.H * kMaxBlocks * (2 + a.D))};
    if (a.S == 1) {  // both ways give the same bits: each row's blocks and their merge are the same
        ld::Pool::get().run(a.B * a.Hkv * kMaxBlocks, attn_group_task, &j, nt);
        ld::Pool::get().run(a.B * a.H, attn_finish_task, &j, nt);
    } else {
        ld::Pool::get().run(rows * a.Hkv, attn_row_task, &j, nt);
    }
    free(parts);
    return LD_OK;
}

}  // namespace
