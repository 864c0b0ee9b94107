// The C interface between the compiled kernels and Python, in one place: the ABI version, the status
// codes every entry point returns (with their messages), and every struct passed across.
//
// Python declares the same structs once (kernels/abi.py) and, when it loads the library, compares each of
// them field by field with the layout this library reports (`ld_abi_field`, `ld_abi_layout`), and its
// version with `ld_abi_version`: a mismatch is an error at load, never a kernel reading the wrong bytes.
// Each struct is written as a field list, F(type, name, array extent), from which both the struct and its
// layout table are made, so a field cannot be added to one and not the other.
//
// Included by native.cpp (the library is one translation unit, so the tables below are defined here).
// The ABI functions are plain C types only, so they can be trusted before the layouts are checked.
// Bump LD_ABI_VERSION, and ABI_VERSION in abi.py, when a function's signature changes.

#pragma once

#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#define LD_ABI_VERSION 7
#define LD_MAX_PARTS 4  // parts of one fused linear layer

// X(name, code, message): codes run 0, -1, -2, ... without gaps (checked below).
#define LD_STATUSES(X)                                                                          \
    X(LD_OK, 0, "ok")                                                                           \
    X(LD_ERR_EMPTY, -1, "empty shape or model (a size is zero or negative)")                    \
    X(LD_ERR_BLOCK_K, -2, "in_features must be a multiple of 32 for block formats")             \
    X(LD_ERR_F32_ACT, -3, "float32 weights need float32 activations")                           \
    X(LD_ERR_FORMAT, -4, "unknown weight format, activation type or key/value cache format")      \
    X(LD_ERR_NO_MEMORY, -5, "out of memory")                                                    \
    X(LD_ERR_HEAD_DIM, -6, "head_dim must be a multiple of 8 and at most 256")                  \
    X(LD_ERR_KV_HEADS, -7, "n_heads must be a positive multiple of n_kv_heads")                 \
    X(LD_ERR_PARTS, -8, "a linear layer has no parts or more than LD_MAX_PARTS (4)")            \
    X(LD_ERR_LINEAR_SHAPE, -9, "a linear layer's shape does not fit the model")                 \
    X(LD_ERR_CACHE_FULL, -10, "the new rows do not fit in the cache")                           \
    X(LD_ERR_HEAD_ROWS, -11, "the output layer's first row is out of range")                    \
    X(LD_ERR_TOKEN, -12, "a token id is outside the vocabulary")                                \
    X(LD_ERR_POSITION, -13, "a position is beyond the rope tables (the model's context)")      \
    X(LD_ERR_FEATURE_LAYER, -14, "a feature layer is outside the model's blocks")               \
    X(LD_ERR_NULL, -15, "a required pointer is null")                                          \
    X(LD_ERR_SUPER_BLOCK_K, -16, "in_features must be a multiple of 256 for K-quant formats")  \
    X(LD_ERR_SEQ_ROWS, -17, "the sequences' rows do not add up to the call's rows")

#define LD_STATUS_ENUM(name, code, message) name = code,
enum LdStatus { LD_STATUSES(LD_STATUS_ENUM) };

// Codes of the weight formats and activation types a linear layer's part takes (LdPart.fmt and .act):
// X(name, code, the name Python uses).
#define LD_FORMATS(X) \
    X(LD_FMT_F32, 0, "f32") \
    X(LD_FMT_Q8_0, 1, "q8_0") \
    X(LD_FMT_Q4_1, 2, "q4_1") \
    X(LD_FMT_Q4_K, 3, "q4_k") \
    X(LD_FMT_Q5_K, 4, "q5_k") \
    X(LD_FMT_Q6_K, 5, "q6_k") \
    X(LD_FMT_Q5_0, 6, "q5_0")
#define LD_ACTS(X) \
    X(LD_ACT_F32, 0, "float32") \
    X(LD_ACT_INT8, 1, "int8")
// Codes of the key/value cache's formats (LdSeq.kv_fmt): float32, or int8 with one float32 scale per
// token of each head (symmetric: scale = max |x| / 127, values rounded to nearest, ties to even).
#define LD_KV_FORMATS(X) \
    X(LD_KV_F32, 0, "float32") \
    X(LD_KV_INT8, 1, "int8")

#define LD_CODE_ENUM(name, code, python_name) name = code,
enum LdFormat { LD_FORMATS(LD_CODE_ENUM) };
enum LdAct { LD_ACTS(LD_CODE_ENUM) };
enum LdKvFormat { LD_KV_FORMATS(LD_CODE_ENUM) };

// ------------------------------------------------------------------ structs

#define LD_DECLARE_FIELD(type, name, extent) type name extent;

// One weight of a linear layer, writing output columns [col, col + N) (formats: see native.cpp).
#define LD_PART_FIELDS(F)                                    \
    F(int32_t, fmt, )      /* LdFormat */ \
    F(int32_t, act, )      /* LdAct */    \
    F(int64_t, N, )                                          \
    F(int64_t, K, )                                          \
    F(int64_t, col, )                                        \
    F(const void*, qs, )                                     \
    F(const uint16_t*, d, )                                  \
    F(const uint16_t*, m, )                                  \
    F(const float*, f, )
struct LdPart {
    LD_PART_FIELDS(LD_DECLARE_FIELD)
};

#define LD_LINEAR_FIELDS(F)                                 \
    F(int64_t, nparts, )                                    \
    F(int64_t, N, ) /* all parts' outputs together */       \
    F(int64_t, K, )                                         \
    F(LdPart, parts, [LD_MAX_PARTS])                        \
    F(const float*, bias, ) /* [N] or null */
struct LdLinear {
    LD_LINEAR_FIELDS(LD_DECLARE_FIELD)
};

#define LD_BLOCK_FIELDS(F)                 \
    F(LdLinear, qkv, )                     \
    F(LdLinear, o, )                       \
    F(LdLinear, w13, )                     \
    F(LdLinear, w2, )                      \
    F(const float*, attn_norm, ) /* [D] */ \
    F(const float*, mlp_norm, )  /* [D] */
struct LdBlock {
    LD_BLOCK_FIELDS(LD_DECLARE_FIELD)
};

#define LD_STACK_FIELDS(F)                    \
    F(int64_t, L, )                           \
    F(int64_t, D, )                           \
    F(int64_t, H, )                           \
    F(int64_t, Hkv, )                         \
    F(int64_t, hd, )                          \
    F(int64_t, I, )                           \
    F(float, eps, )                           \
    F(const LdBlock*, blocks, ) /* [L] */
struct LdStack {
    LD_STACK_FIELDS(LD_DECLARE_FIELD)
};

// The new rows as token ids and rope positions, looked up inside the call.
#define LD_INPUTS_FIELDS(F)                              \
    F(const int64_t*, tokens, )    /* [S] */             \
    F(const float*, embed, )       /* [vocab, D] */      \
    F(int64_t, vocab, )                                  \
    F(const int64_t*, positions, ) /* [S] */             \
    F(const float*, cos_table, )   /* [max_pos, hd] */   \
    F(const float*, sin_table, )   /* [max_pos, hd] */   \
    F(int64_t, max_pos, )
struct LdInputs {
    LD_INPUTS_FIELDS(LD_DECLARE_FIELD)
};

// One sequence's part of a call: its S rows (consecutive in the call's rows) after its n cached ones, in its
// own cache. Sequences share the weight pass and nothing else: each row attends only to its own sequence.
#define LD_SEQ_FIELDS(F)                                                                          \
    F(int64_t, S, )                                                                               \
    F(int64_t, n, )                                                                               \
    F(void*, kc, )            /* [L, Hkv, Tmax, hd] key cache (float or int8: kv_fmt) */          \
    F(void*, vc, )            /* [L, Hkv, Tmax, hd] value cache */                                \
    F(float*, ks, )           /* int8: [L, Hkv, Tmax] the keys' scales (float32: unused) */       \
    F(float*, vs, )           /* int8: [L, Hkv, Tmax] the values' scales */                       \
    F(int64_t, kv_fmt, )      /* LdKvFormat */                                                    \
    F(int64_t, Tmax, )                                                                            \
    F(const uint8_t*, mask, ) /* [S, n + S] (row stride mask_stride), or null for causal */       \
    F(int64_t, mask_stride, )                                                                     \
    F(int64_t, head_from, )   /* with a head: logits of rows [head_from, S) (S: none) */
struct LdSeq {
    LD_SEQ_FIELDS(LD_DECLARE_FIELD)
};

// One call of ld_stack_forward: S new rows, the rows of nseq sequences one after another.
#define LD_FORWARD_ARGS_FIELDS(F)                                                                    \
    F(float*, x, )                   /* [S, D] out: the residual stream after the last block */      \
    F(int64_t, S, )                  /* every sequence's rows together */                            \
    F(const LdSeq*, seqs, )          /* [nseq] */                                                    \
    F(int64_t, nseq, )                                                                               \
    F(const uint8_t*, skip, )        /* [L, 2] (attention, MLP) or null */                           \
    F(const float*, norm_w, )        /* [D] the final RMSNorm's weight, with head */                 \
    F(float, norm_eps, )                                                                             \
    F(const LdLinear*, head, )       /* the output layer, or null: no logits */                      \
    F(float*, logits, )              /* [sum of the sequences' head rows, head->N], in their order */ \
    F(int64_t, nfeat, )              /* feature outputs (0: none) */                                 \
    F(const int64_t*, feat_layers, ) /* [nfeat] block indices */                                     \
    F(float*, feats, )               /* [nfeat, S, D]: x after block feat_layers[j] into feats[j] */ \
    F(int32_t, threads, )
struct LdForwardArgs {
    LD_FORWARD_ARGS_FIELDS(LD_DECLARE_FIELD)
};

#define LD_STRUCTS(X)                        \
    X(LdPart, LD_PART_FIELDS)                \
    X(LdLinear, LD_LINEAR_FIELDS)            \
    X(LdBlock, LD_BLOCK_FIELDS)              \
    X(LdStack, LD_STACK_FIELDS)              \
    X(LdInputs, LD_INPUTS_FIELDS)            \
    X(LdSeq, LD_SEQ_FIELDS)                  \
    X(LdForwardArgs, LD_FORWARD_ARGS_FIELDS)

// ------------------------------------------------------------------ layout tables

namespace ld_abi {

struct Field {
    const char* name;
    int64_t offset, size;
    char kind;  // 'i' integer, 'f' floating point, 'p' pointer, 's' struct (or array of them)
};

struct Struct {
    const char* name;
    int64_t size;
    const Field* fields;
    int64_t nfields;
};

template <class T>
constexpr char kind() {
    using E = std::remove_all_extents_t<T>;
    return std::is_pointer_v<E> ? 'p' : std::is_floating_point_v<E> ? 'f' : std::is_integral_v<E> ? 'i' : 's';
}

#define LD_FIELD_ROW(type, name, extent) {#name, (int64_t)offsetof(Self, name), (int64_t)sizeof(type extent), kind<type extent>()},
#define LD_FIELD_TABLE(S, FIELDS)                  \
    namespace S##_layout {                         \
    using Self = S;                                \
    const Field fields[] = {FIELDS(LD_FIELD_ROW)}; \
    }
LD_STRUCTS(LD_FIELD_TABLE)

#define LD_STRUCT_ROW(S, FIELDS) {#S, (int64_t)sizeof(S), S##_layout::fields, (int64_t)(sizeof(S##_layout::fields) / sizeof(Field))},
const Struct structs[] = {LD_STRUCTS(LD_STRUCT_ROW)};

#define LD_STATUS_CODE(name, code, message) code,
constexpr int codes[] = {LD_STATUSES(LD_STATUS_CODE)};
constexpr int nstatus = (int)(sizeof(codes) / sizeof(codes[0]));

constexpr bool codes_contiguous() {
    for (int i = 0; i < nstatus; ++i)
        if (codes[i] != -i) return false;
    return true;
}
static_assert(codes_contiguous(), "status codes must run 0, -1, -2, ... in order");

inline const Struct* find(const char* name) {
    for (const Struct& s : structs)
        if (name && strcmp(s.name, name) == 0) return &s;
    return nullptr;
}

}  // namespace ld_abi

extern "C" {

int ld_abi_version() { return LD_ABI_VERSION; }

// Statuses are 0 (LD_OK) down to 1 - ld_status_count().
int ld_status_count() { return ld_abi::nstatus; }

#define LD_STATUS_CASE_NAME(name, code, message) \
    case code:                                   \
        return #name;
#define LD_STATUS_CASE_MESSAGE(name, code, message) \
    case code:                                      \
        return message;

// The enumerator's name of a status (LD_ERR_TOKEN), or null for a code that is none.
const char* ld_status_name(int status) {
    switch (status) { LD_STATUSES(LD_STATUS_CASE_NAME) }
    return nullptr;
}

// What a status means, for an error message; never null.
const char* ld_status_message(int status) {
    switch (status) { LD_STATUSES(LD_STATUS_CASE_MESSAGE) }
    return "unknown status code";
}

#define LD_CODE_CASE(name, code, python_name) \
    if (strcmp(value, python_name) == 0) return code;

// The code of weight format `value` (kind "format"), activation type (kind "act") or key/value cache
// format (kind "kv"), or -1.
int ld_abi_code(const char* kind, const char* value) {
    if (!kind || !value) return -1;
    if (strcmp(kind, "format") == 0) { LD_FORMATS(LD_CODE_CASE) }
    if (strcmp(kind, "act") == 0) { LD_ACTS(LD_CODE_CASE) }
    if (strcmp(kind, "kv") == 0) { LD_KV_FORMATS(LD_CODE_CASE) }
    return -1;
}

// offsetof(struct_name, field_name), or sizeof(struct_name) for field "sizeof"; -1 for an unknown name.
int64_t ld_abi_layout(const char* struct_name, const char* field_name) {
    const ld_abi::Struct* s = ld_abi::find(struct_name);
    if (!s || !field_name) return -1;
    if (strcmp(field_name, "sizeof") == 0) return s->size;
    for (int64_t i = 0; i < s->nfields; ++i)
        if (strcmp(s->fields[i].name, field_name) == 0) return s->fields[i].offset;
    return -1;
}

// The name of field `index` of `struct_name` in declaration order, with its offset, size and kind
// (see ld_abi::Field) in the out-arguments; null past the last field or for an unknown struct.
const char* ld_abi_field(const char* struct_name, int64_t index, int64_t* offset, int64_t* size, char* kind) {
    const ld_abi::Struct* s = ld_abi::find(struct_name);
    if (!s || index < 0 || index >= s->nfields) return nullptr;
    const ld_abi::Field& f = s->fields[index];
    *offset = f.offset, *size = f.size, *kind = f.kind;
    return f.name;
}

}  // extern "C"
