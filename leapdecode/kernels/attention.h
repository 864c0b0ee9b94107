// Row-invariant attention (included by native.cpp).
//
// One query row attends to the keys its mask allows, taken in slot order as one compacted sequence:
// every reduction (scores, max, sum of exponentials, weighted sum of values) depends only on that
// sequence, so a draft node sees exactly the arithmetic of the same token decoded alone, whether its
// keys sit in consecutive slots (a chain) or between sibling branches (a tree).
//
// (Blocking rows and heads so that a block of keys is read once for several queries measured no faster
// here: at head_dim 64 the per-key arithmetic, not memory, bounds this kernel.)

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

inline float dot(const float* a, const float* b, int64_t D) {  // D % 8 == 0
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    for (int64_t c = 8; c < D; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
    return hsum8(acc);
}

// Scores of 8 keys at once, each exactly as `dot` computes it (8 independent chains of multiply-adds
// instead of one after another). Measured against one key at a time, outputs bit-identical: 0.95x the
// time for one query after 700 keys at head_dim 64, 0.88x at 128, 0.92x for 7 queries, 0.96x for a
// 700-token prefill (the CPU already overlapped most of the separate chains).
inline void dot8(const float* q, const float* k, const int32_t* idx, int64_t kstride, int64_t D, float* out) {
    __m256 acc[8];
    const __m256 q0 = _mm256_loadu_ps(q);
    LD_UNROLL for (int r = 0; r < 8; ++r) acc[r] = _mm256_mul_ps(q0, _mm256_loadu_ps(k + idx[r] * kstride));
    for (int64_t c = 8; c < D; c += 8) {
        const __m256 qc = _mm256_loadu_ps(q + c);
        LD_UNROLL for (int r = 0; r < 8; ++r)
            acc[r] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + idx[r] * kstride + c), acc[r]);
    }
    LD_UNROLL for (int r = 0; r < 8; ++r) out[r] = hsum8(acc[r]);
}

struct AttnArgs {
    const float *q, *k, *v;
    float* out;
    int64_t B, H, Hkv, S, T, D;
    const int64_t *qst, *kst, *vst, *ost;  // strides of dims (batch, head, row); the last dim is contiguous
    const uint8_t* mask;                    // [S, T] (row stride mask_stride), or null for causal
    int64_t mask_stride;
    float scale;
};

// o = inv * sum_j p[j] v[idx[j]]: each output element accumulates its products in j order, so the vector
// width (16 columns at a time with AVX-512, else 8) never changes a bit of it.
inline void weighted_values(const float* v, int64_t vstride, const int32_t* idx, const float* p, int64_t n,
                            int64_t D, float inv, float* o) {
#if LD_VNNI512
    if (D % 16 == 0) {
        __m512 acc[16];  // D <= 256
        const int64_t C = D / 16;
        for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
            const __m512 pj = _mm512_set1_ps(p[j]);
            const float* vr = v + idx[j] * vstride;
            for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 16 * c), acc[c]);
        }
        for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
        return;
    }
#endif
    __m256 acc[32];  // D <= 256
    const int64_t C = D / 8;
    for (int64_t c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_broadcast_ss(p + j);
        const float* vr = v + idx[j] * vstride;
        for (int64_t c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * c), acc[c]);
    }
    for (int64_t c = 0; c < C; ++c) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}

void attend_row(const AttnArgs& a, int64_t b, int64_t h, int64_t i, int32_t* idx, float* p) {
    const int64_t hk = h / (a.H / a.Hkv), D = a.D;
    const float* q = a.q + b * a.qst[0] + h * a.qst[1] + i * a.qst[2];
    const float* k = a.k + b * a.kst[0] + hk * a.kst[1];
    const float* v = a.v + b * a.vst[0] + hk * a.vst[1];
    int64_t n = 0;
    if (a.mask) {
        const uint8_t* mrow = a.mask + i * a.mask_stride;
        for (int64_t t = 0; t < a.T; ++t)
            if (mrow[t]) idx[n++] = (int32_t)t;
    } else {
        for (int64_t t = 0; t <= a.T - a.S + i; ++t) idx[n++] = (int32_t)t;
    }
    float* o = a.out + b * a.ost[0] + h * a.ost[1] + i * a.ost[2];
    if (n == 0) {
        for (int64_t c = 0; c < D; ++c) o[c] = 0.0f;
        return;
    }
    int64_t j8 = 0;
    for (; j8 + 8 <= n; j8 += 8) dot8(q, k, idx + j8, a.kst[2], D, p + j8);
    for (int64_t j = j8; j < n; ++j) p[j] = dot(q, k + idx[j] * a.kst[2], D);
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
        p[j] *= a.scale;
        mx = p[j] > mx ? p[j] : mx;
    }
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 lsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {  // p has room for a padded last chunk
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), vmx));
        if (n - j < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(tail_mask(n - j)));
        _mm256_storeu_ps(p + j, e);
        lsum = _mm256_add_ps(lsum, e);
    }
    weighted_values(v, a.vst[2], idx, p, n, D, 1.0f / hsum8(lsum), o);
}

struct AttnJob {
    AttnArgs a;
    int64_t room;
    int32_t* idx;
    float* p;
};

void attn_chunk(void* ctx, int64_t task, int worker) {
    const AttnJob& j = *(const AttnJob*)ctx;
    const int64_t H = j.a.H, S = j.a.S;
    attend_row(j.a, task / (H * S), task / S % H, task % S, j.idx + worker * j.room, j.p + worker * j.room);
}

int check_attention(int64_t H, int64_t Hkv, int64_t D) {
    if (D % 8 != 0 || D > 256) return -6;
    if (Hkv <= 0 || H % Hkv != 0) return -7;
    return 0;
}

// Threads attention uses for these sizes.
inline int attention_threads(const AttnArgs& a, int threads) {
    return a.B * a.H * a.S * a.T * a.D < (1 << 15) ? 1 : threads;
}

// Scratch per thread: compacted key indices (ints) and scores (floats), padded to a chunk of 8.
inline int64_t attention_room(int64_t T) { return T + 8; }
inline int64_t attention_room(const AttnArgs& a) { return attention_room(a.T); }

void attention(const AttnArgs& a, int nt, int32_t* idx, float* p) {
    AttnJob j{a, attention_room(a), idx, p};
    ld::Pool::get().run(a.B * a.H * a.S, attn_chunk, &j, nt);
}

}  // namespace
