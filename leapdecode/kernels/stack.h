// The transformer blocks of a Llama-family model in one call: for S new rows, every block's RMSNorm,
// fused q/k/v projection (+ bias), RoPE, key/value cache write, attention, output projection, residual,
// RMSNorm, fused gate/up projection, SiLU-gated product, down projection and residual.
//
// Why: with the matrices in these kernels a one-token step of a small model spent as long in ~25 small
// Python/torch operations per block as in the matrices. Everything here works row by row with a fixed
// order of operations, so (like the linear and attention kernels) the output of a row never depends on
// how many rows are computed together: verifying a draft stays bit-identical to one-token steps.
//
// Included at the end of native.cpp (one translation unit, so it shares the kernels' internals).

namespace {

// The structs passed in (LdStack, LdInputs, LdForwardArgs, ...) are declared in abi.h.

struct StepArgs {  // one call: S new rows, the rows of nseq sequences one after another
    float* x;                 // [S, D] residual stream, updated in place
    int64_t S;
    const LdSeq* seqs;        // [nseq], each with its own cache slots [L, Hkv, Tmax, hd]
    int64_t nseq;
    const int64_t* start;     // [nseq + 1]: the first row of each sequence, then S
    const int64_t* seq_of;    // [S]: the sequence of each row
    const float *cos, *sin;   // [S, hd]
    const uint8_t* skip;      // [L, 2] (attention, MLP) or null
    int threads;
};

// f(i) for every row i < S, on the pool's threads when there are enough rows to pay for it.
template <class F>
void for_rows(int64_t S, int threads, F& f) {
    constexpr int64_t kRows = 8;
    struct Ctx {
        F* f;
        int64_t S;
    } c{&f, S};
    auto chunk = [](void* ctx, int64_t k, int) {
        const Ctx& c = *(const Ctx*)ctx;
        const int64_t e = (k + 1) * kRows < c.S ? (k + 1) * kRows : c.S;
        for (int64_t i = k * kRows; i < e; ++i) (*c.f)(i);
    };
    ld::Pool::get().run(ceil_div(S, kRows), chunk, &c, S >= 2 * kRows ? threads : 1);
}

void rmsnorm_row(const float* x, const float* w, float* out, int64_t D, float eps) {
    const int64_t D8 = D & ~int64_t(7);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < D8; c += 8) {
        const __m256 v = _mm256_loadu_ps(x + c);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float ss = hsum8(acc);
    for (int64_t c = D8; c < D; ++c) ss += x[c] * x[c];
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t c = 0; c < D; ++c) out[c] = w[c] * (x[c] * r);
}

// Half-split rotary embedding of one head, in place (the reference's rotate_half layout).
inline void rope_head(float* x, const float* cos, const float* sin, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t j = 0; j < half; ++j) {
        const float a = x[j], b = x[j + half];
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

// out[c] = silu(g[c]) * u[c], with sigmoid from exp of a non-positive argument (no overflow).
void silu_mul_row(const float* g, const float* u, float* out, int64_t I) {
    const int64_t I8 = I & ~int64_t(7);
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t c = 0; c < I8; c += 8) {
        const __m256 v = _mm256_loadu_ps(g + c);
        const __m256 e = exp256(_mm256_or_ps(v, sign));  // exp(-|v|)
        const __m256 pos = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 neg = _mm256_div_ps(e, _mm256_add_ps(one, e));
        const __m256 sig = _mm256_blendv_ps(pos, neg, v);  // sign bit of v picks the form
        _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_mul_ps(v, sig), _mm256_loadu_ps(u + c)));
    }
    for (int64_t c = I8; c < I; ++c) {
        const float v = g[c], e = expf(-fabsf(v));
        const float sig = v >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
        out[c] = v * sig * u[c];
    }
}

LdStatus check_parts(const LdLinear& lin) {
    if (lin.nparts < 1 || lin.nparts > LD_MAX_PARTS) return LD_ERR_PARTS;
    for (int64_t p = 0; p < lin.nparts; ++p)
        if (const LdStatus rc = check_linear(lin.parts[p].fmt, lin.parts[p].act, lin.parts[p].K)) return rc;
    return LD_OK;
}

LdStatus check_stack(const LdStack& st) {
    if (st.L <= 0 || st.D <= 0 || st.I <= 0) return LD_ERR_EMPTY;
    if (!st.blocks) return LD_ERR_NULL;
    if (const LdStatus rc = check_attention(st.H, st.Hkv, st.hd)) return rc;
    for (int64_t l = 0; l < st.L; ++l) {
        const LdBlock& b = st.blocks[l];
        for (const LdLinear* lin : {&b.qkv, &b.o, &b.w13, &b.w2})
            if (const LdStatus rc = check_parts(*lin)) return rc;
        if (b.qkv.N != (st.H + 2 * st.Hkv) * st.hd || b.qkv.K != st.D || b.o.N != st.D || b.o.K != st.H * st.hd ||
            b.w13.N != 2 * st.I || b.w13.K != st.D || b.w2.N != st.D || b.w2.K != st.I)
            return LD_ERR_LINEAR_SHAPE;
    }
    return LD_OK;
}

void run_linear_parts(const LdLinear& lin, int64_t M, const float* x, float* y, int threads, void* scratch) {
    for (int64_t p = 0; p < lin.nparts; ++p) {
        const LdPart& w = lin.parts[p];
        linear(w.fmt, w.act, M, w.N, w.K, x, lin.K, w.qs, w.d, w.m, w.f, y + w.col, lin.N, threads, scratch);
    }
    if (lin.bias)
        for (int64_t i = 0; i < M; ++i)
            for (int64_t c = 0; c < lin.N; ++c) y[i * lin.N + c] += lin.bias[c];
}

struct Buffers {  // per call, sized for S rows
    float *h, *qkv, *att, *gu, *act, *tmp;
    void* attn;     // attention's scratch
    void* scratch;  // int8 activations
};

// Element e of a sequence's key (value) cache, as stored: float32, or int8 (kv_fmt).
inline const void* kv_at(const LdSeq& q, const void* c, int64_t e) {
    return q.kv_fmt == LD_KV_INT8 ? (const void*)((const int8_t*)c + e) : (const void*)((const float*)c + e);
}

// Attention of sequence j's rows over its own cache (keys and values of block l already written).
// The longest sequence's keys (cached and new): the room of attention's scratch.
int64_t max_context(const StepArgs& a) {
    int64_t T = 0;
    for (int64_t j = 0; j < a.nseq; ++j) T = std::max(T, a.seqs[j].n + a.seqs[j].S);
    return T;
}

// Sequence j's attention arguments for block l: its rows' queries and outputs, its cache and mask.
// `qst`, `ost` [3] and `kst` [3] (this sequence's) are the strides the arguments point to.
AttnArgs seq_attn_args(const LdStack& st, const StepArgs& a, int64_t l, int64_t j, const Buffers& b,
                       const int64_t* qst, const int64_t* ost, int64_t* kst) {
    const LdSeq& q = a.seqs[j];
    const int64_t hd = st.hd, Nq = st.H * hd, Nqkv = Nq + 2 * st.Hkv * hd, r0 = a.start[j];
    kst[0] = 0, kst[1] = q.Tmax * hd, kst[2] = hd;
    const int64_t layer = l * st.Hkv * q.Tmax;  // [Hkv, Tmax, hd] per layer
    AttnArgs at{b.qkv + r0 * Nqkv, kv_at(q, q.kc, layer * hd), kv_at(q, q.vc, layer * hd), b.att + r0 * Nq, 1, st.H,
                st.Hkv, q.S, q.n + q.S, hd, qst, kst, kst, ost, q.mask, q.mask_stride,
                (float)pow((double)hd, -0.5)};  // as d ** -0.5
    if (q.kv_fmt == LD_KV_INT8) {
        at.kv_fmt = LD_KV_INT8, at.ks = q.ks + layer, at.vs = q.vs + layer;
        at.sst[0] = 0, at.sst[1] = q.Tmax;
    }
    return at;
}

struct SeqsJob {  // every sequence's row tasks in one pool run
    const AttnJob* jobs;   // [nseq]
    const int64_t* first;  // [nseq + 1]: each sequence's first task
    int64_t nseq;
};

void seqs_row_task(void* ctx, int64_t task, int worker) {
    const SeqsJob& m = *(const SeqsJob*)ctx;
    int64_t j = 0;
    while (task >= m.first[j + 1]) ++j;
    attn_row_task((void*)&m.jobs[j], task - m.first[j], worker);
}

// Attention of every sequence's rows over its own cache (keys and values of block l already written).
// One sequence: attention() itself. Several: one pool run of attention()'s row tasks (a task per
// sequence, key/value head and row: the bits of its one-row path too, see there), so a batch of
// one-row sequences pays one dispatch per block rather than two per sequence.
LdStatus seqs_attention(const LdStack& st, const StepArgs& a, int64_t l, Buffers& b) {
    const int64_t hd = st.hd, Nq = st.H * hd, qst[3] = {0, hd, Nq + 2 * st.Hkv * hd}, ost[3] = {0, hd, Nq};
    const int64_t n = a.nseq, per_row = st.H * kMaxBlocks * (2 + hd), T = max_context(a);
    if (n == 1) {
        int64_t kst[3];
        const AttnArgs at = seq_attn_args(st, a, l, 0, b, qst, ost, kst);
        return attention(at, attention_threads(at, a.threads), b.attn);
    }
    char* mem = (char*)malloc(sizeof(AttnJob) * n + sizeof(int64_t) * (4 * n + 1 + a.S) + sizeof(float) * a.S * per_row);
    if (!mem) return LD_ERR_NO_MEMORY;
    AttnJob* jobs = (AttnJob*)mem;
    int64_t *kst = (int64_t*)(jobs + n), *first = kst + 3 * n, *blocks = first + n + 1;
    float* parts = (float*)(blocks + a.S);
    const int64_t room = attention_room(T);
    first[0] = 0;
    for (int64_t j = 0; j < n; ++j) {
        const AttnArgs at = seq_attn_args(st, a, l, j, b, qst, ost, kst + 3 * j);
        jobs[j] = AttnJob{at, room, (int32_t*)b.attn, (float*)((int32_t*)b.attn + room * a.threads),
                          parts + a.start[j] * per_row, blocks + a.start[j]};
        first[j + 1] = first[j] + a.seqs[j].S * st.Hkv;
    }
    SeqsJob m{jobs, first, n};
    ld::Pool::get().run(first[n], seqs_row_task, &m, first[n] > 1 ? a.threads : 1);
    free(mem);
    return LD_OK;
}

// One head's key or value row x [hd] into the cache at element e (int8: its scale at token slot t).
inline void write_kv(const LdSeq& q, void* c, float* scales, int64_t e, int64_t t, const float* x, int64_t hd) {
    if (q.kv_fmt != LD_KV_INT8) {
        memcpy((float*)c + e, x, sizeof(float) * hd);
        return;
    }
    float amax = 0.0f;
    for (int64_t d = 0; d < hd; ++d) amax = fabsf(x[d]) > amax ? fabsf(x[d]) : amax;
    const float s = amax / 127.0f;  // symmetric, as leapdecode.cache.quantize
    int8_t* out = (int8_t*)c + e;
    for (int64_t d = 0; d < hd; ++d) {
        const float r = s > 0.0f ? nearbyintf(x[d] / s) : 0.0f;  // ties to even
        out[d] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
    }
    scales[t] = s;
}

LdStatus attention_part(const LdStack& st, const StepArgs& a, int64_t l, Buffers& b) {
    const int64_t S = a.S, hd = st.hd, Nq = st.H * hd, Nkv = st.Hkv * hd, Nqkv = Nq + 2 * Nkv;
    const LdBlock& blk = st.blocks[l];
    auto norm = [&](int64_t i) { rmsnorm_row(a.x + i * st.D, blk.attn_norm, b.h + i * st.D, st.D, st.eps); };
    for_rows(S, a.threads, norm);
    run_linear_parts(blk.qkv, S, b.h, b.qkv, a.threads, b.scratch);
    auto rope = [&](int64_t i) {
        const LdSeq& q = a.seqs[a.seq_of[i]];
        const int64_t slot = q.n + i - a.start[a.seq_of[i]], layer = l * st.Hkv * q.Tmax;
        float* row = b.qkv + i * Nqkv;
        const float *cos = a.cos + i * hd, *sin = a.sin + i * hd;
        for (int64_t h = 0; h < st.H + st.Hkv; ++h) rope_head(row + h * hd, cos, sin, hd);
        for (int64_t h = 0; h < st.Hkv; ++h) {
            const int64_t t = layer + h * q.Tmax + slot;  // the token's slot of this head and layer
            write_kv(q, q.kc, q.ks, t * hd, t, row + Nq + h * hd, hd);
            write_kv(q, q.vc, q.vs, t * hd, t, row + Nq + Nkv + h * hd, hd);
        }
    };
    for_rows(S, a.threads, rope);
    if (const LdStatus rc = seqs_attention(st, a, l, b)) return rc;
    run_linear_parts(blk.o, S, b.att, b.tmp, a.threads, b.scratch);
    auto residual = [&](int64_t i) {
        for (int64_t c = 0; c < st.D; ++c) a.x[i * st.D + c] += b.tmp[i * st.D + c];
    };
    for_rows(S, a.threads, residual);
    return LD_OK;
}

void mlp_part(const LdStack& st, const StepArgs& a, int64_t l, Buffers& b) {
    const int64_t S = a.S, I = st.I;
    const LdBlock& blk = st.blocks[l];
    auto norm = [&](int64_t i) { rmsnorm_row(a.x + i * st.D, blk.mlp_norm, b.h + i * st.D, st.D, st.eps); };
    for_rows(S, a.threads, norm);
    run_linear_parts(blk.w13, S, b.h, b.gu, a.threads, b.scratch);
    auto gate = [&](int64_t i) { silu_mul_row(b.gu + i * 2 * I, b.gu + i * 2 * I + I, b.act + i * I, I); };
    for_rows(S, a.threads, gate);
    run_linear_parts(blk.w2, S, b.act, b.tmp, a.threads, b.scratch);
    auto residual = [&](int64_t i) {
        for (int64_t c = 0; c < st.D; ++c) a.x[i * st.D + c] += b.tmp[i * st.D + c];
    };
    for_rows(S, a.threads, residual);
}

LdStatus check_head(const LdStack& st, const LdLinear& head) {
    if (const LdStatus rc = check_parts(head)) return rc;
    return head.K == st.D && head.N > 0 ? LD_OK : LD_ERR_LINEAR_SHAPE;
}

// The final RMSNorm and the output layer over the R rows `rows` of the residual stream, into logits [R, N].
void head_part(const LdStack& st, const StepArgs& a, const LdForwardArgs& f, const int64_t* rows, int64_t R,
               Buffers& b) {
    auto norm = [&](int64_t i) { rmsnorm_row(a.x + rows[i] * st.D, f.norm_w, b.h + i * st.D, st.D, f.norm_eps); };
    for_rows(R, a.threads, norm);
    run_linear_parts(*f.head, R, b.h, f.logits, a.threads, b.scratch);
}

LdStatus check_inputs(const LdInputs& in, int64_t S) {
    if (!in.tokens || !in.embed || !in.positions || !in.cos_table || !in.sin_table) return LD_ERR_NULL;
    for (int64_t i = 0; i < S; ++i) {
        if (in.tokens[i] < 0 || in.tokens[i] >= in.vocab) return LD_ERR_TOKEN;
        if (in.positions[i] < 0 || in.positions[i] >= in.max_pos) return LD_ERR_POSITION;
    }
    return LD_OK;
}

// Each sequence's rows, cache and head rows; their rows must add up to the call's.
LdStatus check_seqs(const LdForwardArgs& f) {
    if (f.nseq < 0) return LD_ERR_EMPTY;
    if (f.nseq > 0 && !f.seqs) return LD_ERR_NULL;
    int64_t rows = 0;
    for (int64_t j = 0; j < f.nseq; ++j) {
        const LdSeq& q = f.seqs[j];
        if (q.S < 0 || q.n < 0) return LD_ERR_EMPTY;
        if (q.n + q.S > q.Tmax) return LD_ERR_CACHE_FULL;
        if (q.kv_fmt != LD_KV_F32 && q.kv_fmt != LD_KV_INT8) return LD_ERR_FORMAT;
        if (q.S > 0 && (!q.kc || !q.vc)) return LD_ERR_NULL;  // (no rows: empty tensors may be null)
        if (q.S > 0 && q.kv_fmt == LD_KV_INT8 && (!q.ks || !q.vs)) return LD_ERR_NULL;
        if (f.head && (q.head_from < 0 || q.head_from > q.S)) return LD_ERR_HEAD_ROWS;
        rows += q.S;
    }
    return rows == f.S ? LD_OK : LD_ERR_SEQ_ROWS;
}

// The rows whose logits a call returns (with a head), in sequence order.
int64_t head_rows(const LdForwardArgs& f, int64_t* rows) {
    int64_t R = 0, r0 = 0;
    for (int64_t j = 0; j < f.nseq; r0 += f.seqs[j++].S)
        for (int64_t i = f.seqs[j].head_from; f.head && i < f.seqs[j].S; ++i) rows[R++] = r0 + i;
    return R;
}

// Everything of one call that is not the model or its inputs.
LdStatus check_args(const LdStack& st, const LdForwardArgs& f) {
    if (f.S < 0 || f.nfeat < 0) return LD_ERR_EMPTY;
    if (const LdStatus rc = check_seqs(f)) return rc;
    if (f.head) {
        if (const LdStatus rc = check_head(st, *f.head)) return rc;
        if (!f.norm_w || !f.logits) return LD_ERR_NULL;
    }
    if (f.nfeat > 0 && !f.feat_layers) return LD_ERR_NULL;
    for (int64_t j = 0; j < f.nfeat; ++j)
        if (f.feat_layers[j] < 0 || f.feat_layers[j] >= st.L) return LD_ERR_FEATURE_LAYER;
    // (no rows: nothing is written, and empty tensors may have null pointers)
    if (f.S > 0 && (!f.x || (f.nfeat > 0 && !f.feats))) return LD_ERR_NULL;
    return LD_OK;
}

// Where each sequence's rows start (`start` [nseq + 1]) and which sequence each row is in (`seq_of` [S]).
void row_index(const LdForwardArgs& f, int64_t* start, int64_t* seq_of) {
    start[0] = 0;
    for (int64_t j = 0; j < f.nseq; ++j) {
        start[j + 1] = start[j] + f.seqs[j].S;
        for (int64_t i = start[j]; i < start[j + 1]; ++i) seq_of[i] = j;
    }
}

// Attention's scratch for the longest sequence (sequences take their turns with it).
size_t seq_attention_bytes(const LdStack& st, const LdForwardArgs& f, int threads) {
    int64_t T = 0;
    for (int64_t j = 0; j < f.nseq; ++j) T = std::max(T, f.seqs[j].n + f.seqs[j].S);
    return attention_scratch_bytes(T, st.H / st.Hkv, threads);
}

// The residual stream after block l into every feature output asking for it (a copy: x is unchanged).
void copy_features(const LdForwardArgs& f, int64_t l, int64_t D) {
    for (int64_t j = 0; j < f.nfeat; ++j)
        if (f.feat_layers[j] == l) memcpy(f.feats + j * f.S * D, f.x, sizeof(float) * f.S * D);
}

// The embedded rows into x [S, D], and each row's rope cos/sin into [S, hd] each.
void gather_inputs(const LdInputs& in, int64_t S, int64_t D, int64_t hd, float* x, float* cos, float* sin) {
    for (int64_t i = 0; i < S; ++i) {
        memcpy(x + i * D, in.embed + in.tokens[i] * D, sizeof(float) * D);
        memcpy(cos + i * hd, in.cos_table + in.positions[i] * hd, sizeof(float) * hd);
        memcpy(sin + i * hd, in.sin_table + in.positions[i] * hd, sizeof(float) * hd);
    }
}

}  // namespace

extern "C" {

// Runs every block of `st` over the S new rows given as token ids and positions (`in`), the rows of
// args->nseq sequences one after another, each in its own cache; leaves the residual stream in args->x
// [S, D]; with args->head, then also the final RMSNorm and the output layer over each sequence's rows
// [head_from, S) into args->logits; with feature layers, a copy of x after each of those blocks.
// Returns LD_OK, or the LdStatus of the first check that failed (nothing written then).
LdStatus ld_stack_forward(const LdStack* st, const LdInputs* in, const LdForwardArgs* args) {
    if (!st || !in || !args) return LD_ERR_NULL;
    const LdForwardArgs& f = *args;
    const int64_t S = f.S;
    if (const LdStatus rc = check_stack(*st)) return rc;
    if (const LdStatus rc = check_args(*st, f)) return rc;
    if (S == 0) return LD_OK;
    if (const LdStatus rc = check_inputs(*in, S)) return rc;
    const int threads = f.threads;
    const int64_t D = st->D, I = st->I, Nqkv = (st->H + 2 * st->Hkv) * st->hd;
    const int64_t floats = S * (D + Nqkv + st->H * st->hd + 2 * I + I + D + 2 * st->hd);
    const int64_t ints = f.nseq + 1 + 2 * S;  // row_index's start and seq_of, head_rows
    const int64_t k_max = std::max({D, I, st->H * st->hd});  // widest input of a linear layer
    const size_t attn_bytes = seq_attention_bytes(*st, f, threads);
    char* mem = (char*)malloc(sizeof(int64_t) * ints + sizeof(float) * floats + attn_bytes +
                              act_scratch_bytes(S, k_max));
    if (!mem) return LD_ERR_NO_MEMORY;
    int64_t* start = (int64_t*)mem;  // 8-byte aligned first, then the floats
    int64_t *seq_of = start + f.nseq + 1, *rows = seq_of + S;
    Buffers b;
    b.h = (float*)(rows + S);
    b.qkv = b.h + S * D;
    b.att = b.qkv + S * Nqkv;
    b.gu = b.att + S * st->H * st->hd;
    b.act = b.gu + S * 2 * I;
    b.tmp = b.act + S * I;
    float* cos = b.tmp + S * D;
    float* sin = cos + S * st->hd;
    b.attn = (void*)(sin + S * st->hd);
    b.scratch = (void*)((char*)b.attn + attn_bytes);
    row_index(f, start, seq_of);
    gather_inputs(*in, S, D, st->hd, f.x, cos, sin);
    const StepArgs a{f.x, S, f.seqs, f.nseq, start, seq_of, cos, sin, f.skip, threads};
    LdStatus rc = LD_OK;
    for (int64_t l = 0; l < st->L && rc == LD_OK; ++l) {
        if (!(f.skip && f.skip[2 * l])) rc = attention_part(*st, a, l, b);
        if (rc == LD_OK && !(f.skip && f.skip[2 * l + 1])) mlp_part(*st, a, l, b);
        if (rc == LD_OK) copy_features(f, l, D);
    }
    const int64_t R = head_rows(f, rows);
    if (f.head && R > 0 && rc == LD_OK) head_part(*st, a, f, rows, R, b);
    free(mem);
    return rc;
}

}  // extern "C"
