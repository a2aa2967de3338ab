// a2sf: the C API of the eviction engine (cpp/include/llama-kv-policy.h).
//
// Every function validates what it is given and returns an error code: nothing
// a caller passes may reach a GGML_ASSERT.

#include "llama-kv-policy.h"
#include "llama-kv-score.h"

#include "llama-context.h"
#include "llama-kv-cache.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace {

// --- the settings table (llama-kv-policy-settings.def) ------------------------------

constexpr int count_choices(const char * s) {
    int n = *s ? 1 : 0;
    for (; *s; ++s) {
        n += *s == '|';
    }
    return n;
}

struct setting_row {
    llama_kv_policy_setting info;
    double (*get)(const llama_kv_policy_params &);
    void   (*set)(llama_kv_policy_params &, double);
};

#define LLAMA_KV_AUTO(v)  true, static_cast<double>(v)
#define LLAMA_KV_NO_AUTO  false, 0.0
const setting_row ROWS[] = {
#define LLAMA_KV_SETTING(name, ctype, type, min, max, auto_, def, choices, help)                               \
    { { #name, LLAMA_KV_SETTING_##type, static_cast<double>(min), static_cast<double>(max), auto_,              \
        static_cast<double>(def), choices, help },                                                             \
      [](const llama_kv_policy_params & p) { return static_cast<double>(p.name); },                             \
      [](llama_kv_policy_params & p, double v) { p.name = static_cast<ctype>(v); } },
#include "llama-kv-policy-settings.def"
#undef LLAMA_KV_SETTING
};
#undef LLAMA_KV_AUTO
#undef LLAMA_KV_NO_AUTO

constexpr int32_t N_ROWS = (int32_t) (sizeof(ROWS) / sizeof(ROWS[0]));

// what a row promises, checked when it is compiled: one name per number of an ENUM, a
// default in range (or the auto value), an auto value outside the range
#define LLAMA_KV_AUTO(v)  (static_cast<double>(v))
#define LLAMA_KV_NO_AUTO  (std::numeric_limits<double>::quiet_NaN())
#define LLAMA_KV_SETTING(name, ctype, type, min, max, auto_, def, choices, help)                               \
    static_assert(LLAMA_KV_SETTING_##type != LLAMA_KV_SETTING_ENUM ||                                         \
                  count_choices(choices) == static_cast<int>(max) - static_cast<int>(min) + 1,                 \
                  #name ": an ENUM names each number in [min, max]");                                          \
    static_assert(LLAMA_KV_SETTING_##type == LLAMA_KV_SETTING_ENUM || count_choices(choices) == 0,             \
                  #name ": only an ENUM has choices");                                                         \
    static_assert((static_cast<double>(min) <= static_cast<double>(def) &&                                     \
                   static_cast<double>(def) <= static_cast<double>(max)) ||                                    \
                  static_cast<double>(def) == auto_, #name ": the default is in range or the auto value");     \
    static_assert(!(static_cast<double>(min) <= auto_ && auto_ <= static_cast<double>(max)),                   \
                  #name ": the auto value lies outside [min, max]");
#include "llama-kv-policy-settings.def"
#undef LLAMA_KV_SETTING
#undef LLAMA_KV_AUTO
#undef LLAMA_KV_NO_AUTO

// a bound as Python's a2sf.policies.Setting prints it
std::string fmt_bound(double v) {
    if (v == (double) INT32_MAX) {
        return "2^31-1";
    }
    if (v == (double) UINT32_MAX) {
        return "2^32-1";
    }
    char buf[64];
    snprintf(buf, sizeof(buf), "%g", v);
    return buf;
}

// a value as briefly as it reads back exactly (as Python's repr)
std::string fmt_value(double v) {
    char buf[64];
    for (int prec = 1; prec <= 17; ++prec) {
        snprintf(buf, sizeof(buf), "%.*g", prec, v);
        if (std::isnan(v) || strtod(buf, nullptr) == v) {
            break;
        }
    }
    return buf;
}

std::string choice_list(const llama_kv_policy_setting & s) {
    std::string out;
    const char * c = s.choices;
    for (int n = (int) s.min; ; ++n) {
        const char * end = strchr(c, '|');
        const std::string name = end ? std::string(c, end) : std::string(c);
        if (!out.empty()) {
            out += ", ";
        }
        out += std::to_string(n) + " (" + name + ")";
        if (!end) {
            break;
        }
        c = end + 1;
    }
    return out;
}

// "" when value is valid for the row, else what is wrong with it
std::string check_value(const llama_kv_policy_setting & s, double v) {
    const std::string got = ", got " + fmt_value(v);
    if (s.has_auto && v == s.auto_value) {
        return "";
    }
    const std::string or_auto = s.has_auto ? " or " + fmt_value(s.auto_value) + " (auto)" : "";
    const bool in_range = v >= s.min && v <= s.max; // false for NaN
    switch (s.type) {
        case LLAMA_KV_SETTING_FLOAT:
            if (!std::isfinite(v) || !in_range) {
                return std::string(s.name) + " must be in [" + fmt_bound(s.min) + ", " + fmt_bound(s.max) + "]" +
                       or_auto + got;
            }
            return "";
        case LLAMA_KV_SETTING_BOOL:
            if (v != 0.0 && v != 1.0) {
                return std::string(s.name) + " must be a bool (0 or 1)" + got;
            }
            return "";
        case LLAMA_KV_SETTING_INT:
        case LLAMA_KV_SETTING_ENUM:
            if (std::isfinite(v) && v != std::floor(v)) {
                return std::string(s.name) + " must be an int" + got;
            }
            if (!in_range) {
                if (s.type == LLAMA_KV_SETTING_ENUM) {
                    return std::string(s.name) + " must be one of " + choice_list(s) +
                           (s.has_auto ? ", or " + fmt_value(s.auto_value) + " (auto)" : "") + got;
                }
                return std::string(s.name) + " must be in [" + fmt_bound(s.min) + ", " + fmt_bound(s.max) + "]" +
                       or_auto + got;
            }
            return "";
    }
    return std::string(s.name) + ": unknown setting type";
}

int32_t fail(const std::string & what, char * msg, size_t msg_size) {
    if (msg != nullptr && msg_size > 0) {
        snprintf(msg, msg_size, "%s", what.c_str());
    }
    return LLAMA_KV_POLICY_ERR_ARG;
}

} // namespace

struct llama_kv_policy_params llama_kv_policy_default_params(void) {
    return llama_kv_policy_defaults();
}

int32_t llama_kv_policy_n_settings(void) {
    return N_ROWS;
}

const struct llama_kv_policy_setting * llama_kv_policy_setting_info(int32_t i) {
    return i >= 0 && i < N_ROWS ? &ROWS[i].info : nullptr;
}

int32_t llama_kv_policy_setting_index(const char * name) {
    for (int32_t i = 0; name != nullptr && i < N_ROWS; ++i) {
        if (strcmp(ROWS[i].info.name, name) == 0) {
            return i;
        }
    }
    return LLAMA_KV_POLICY_ERR_ARG;
}

double llama_kv_policy_get_value(const struct llama_kv_policy_params * params, int32_t i) {
    if (params == nullptr || i < 0 || i >= N_ROWS) {
        return NAN;
    }
    return ROWS[i].get(*params);
}

int32_t llama_kv_policy_set_value(struct llama_kv_policy_params * params, int32_t i, double value,
                                  char * msg, size_t msg_size) {
    if (params == nullptr || i < 0 || i >= N_ROWS) {
        return fail("llama_kv_policy_set_value: no setting " + std::to_string(i), msg, msg_size);
    }
    const std::string bad = check_value(ROWS[i].info, value);
    if (!bad.empty()) {
        return fail(bad, msg, msg_size);
    }
    ROWS[i].set(*params, value);
    return 0;
}

int32_t llama_kv_policy_check(const struct llama_kv_policy_params * params, char * msg, size_t msg_size) {
    if (params == nullptr) {
        return fail("llama_kv_policy_check: params is NULL", msg, msg_size);
    }
    if (params->kind < LLAMA_KV_POLICY_NONE || params->kind > LLAMA_KV_POLICY_RANDOM) {
        return fail("unknown policy kind " + std::to_string(params->kind) +
                    ": must be 0 (none), 1 (streaming), 2 (score) or 3 (random)", msg, msg_size);
    }
    for (const auto & row : ROWS) {
        const std::string bad = check_value(row.info, row.get(*params));
        if (!bad.empty()) {
            return fail(bad, msg, msg_size);
        }
    }
    if (msg != nullptr && msg_size > 0) {
        msg[0] = '\0';
    }
    return 0;
}

int32_t llama_kv_policy_set(struct llama_context * ctx, const struct llama_kv_policy_params * params) {
    if (ctx == nullptr || params == nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    const auto & p = *params;
    if (llama_kv_policy_check(params, nullptr, 0) != 0) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }

    llama_kv_cache * kv = llama_kv_score_access::get_kv(*ctx);
    if (p.kind != LLAMA_KV_POLICY_NONE && kv == nullptr) {
        return LLAMA_KV_POLICY_ERR_MEMORY;
    }

    llama_kv_policy_cfg c;
    c.params = p;
    if (p.granularity == LLAMA_KV_GRANULARITY_AUTO) {
        // per (layer, KV head) selection is what makes scores beat recency (docs/RESULTS.md,
        // "Perplexity by granularity and mode"); token where per-head moves cannot be exact
        // (ALiBi), or where a head's row of K is not whole blocks of a quantized type (a head's
        // row cannot move alone)
        bool per_head = kv != nullptr && !llama_kv_score_access::uses_alibi(*ctx) &&
                        llama_kv_score_access::unit_rows_whole_blocks(*kv);
        c.params.granularity = per_head ? LLAMA_KV_GRANULARITY_HEAD : LLAMA_KV_GRANULARITY_TOKEN;
    }

    // ALiBi biases attention by the distance of the cell's position: tokens moved into
    // other cells would keep the wrong bias (layer/head granularity is refused there)
    if (kv && c.scored() && c.granularity() != LLAMA_KV_GRANULARITY_TOKEN &&
        llama_kv_score_access::uses_alibi(*ctx)) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }

    auto & cur = llama_kv_score_access::cfg(*ctx);
    // the unit map records writes only while a policy tracks it: a map kept across a
    // policy that did not track it would miss the cells written meanwhile
    if (kv && c.tracks_units() && !cur.tracks_units()) {
        llama_kv_score_access::reset_units(*kv);
    }
    if (cur != c) {
        if (kv) {
            // the pending decode queries were evaluated under the old policy
            llama_kv_score_access::flush_lazy(*ctx, *kv);
        }
        cur = c;
        llama_kv_score_access::invalidate_graphs(*ctx);
    }
    llama_kv_score_access::state(*ctx).rng.seed(p.seed);

    return 0;
}

int32_t llama_kv_policy_get(const struct llama_context * ctx, struct llama_kv_policy_params * out) {
    if (ctx == nullptr || out == nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    *out = llama_kv_score_access::cfg(const_cast<llama_context &>(*ctx)).params;
    return 0;
}

bool llama_kv_policy_auto_decode_unfused(void) {
    return llama_kv_score_access::cpu_unfused_decode_faster();
}

int32_t llama_kv_policy_n_layers(const struct llama_context * ctx) {
    if (ctx == nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    const llama_kv_cache * kv = llama_kv_score_access::get_kv(*ctx);
    return kv ? llama_kv_score_access::n_scored_layers(*kv) : 0;
}

int32_t llama_kv_policy_scored_layer_ids(const struct llama_context * ctx, int32_t capacity, int32_t * ids_out) {
    if (ctx == nullptr || capacity < 0 || (capacity > 0 && ids_out == nullptr)) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    const llama_kv_cache * kv = llama_kv_score_access::get_kv(*ctx);
    if (kv == nullptr) {
        return 0;
    }
    const auto ids = llama_kv_score_access::scored_layer_ids(*kv);
    for (size_t i = 0; i < ids.size() && (int32_t) i < capacity; ++i) {
        ids_out[i] = ids[i];
    }
    return (int32_t) ids.size();
}

int32_t llama_kv_policy_n_cells(const struct llama_context * ctx, llama_seq_id seq_id) {
    if (ctx == nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    const llama_kv_cache * kv = llama_kv_score_access::get_kv(*ctx);
    if (kv == nullptr) {
        return LLAMA_KV_POLICY_ERR_MEMORY;
    }
    if (!llama_kv_score_access::valid_seq(*kv, seq_id)) {
        return LLAMA_KV_POLICY_ERR_SEQ;
    }
    return llama_kv_score_access::n_cells(*kv, seq_id);
}

int32_t llama_kv_policy_scores(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        int32_t                capacity,
        llama_pos            * pos_out,
        int32_t              * cell_out,
        float                * scores_out) {
    if (ctx == nullptr || capacity < 0) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    return llama_kv_score_access::read_scores(*ctx, seq_id, capacity, pos_out, cell_out, scores_out);
}

int32_t llama_kv_policy_get_stats(const struct llama_context * ctx, struct llama_kv_policy_stats * out) {
    if (ctx == nullptr || out == nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    auto & lctx = const_cast<llama_context &>(*ctx);
    const auto & st = llama_kv_score_access::state(lctx);
    out->n_evictions     = st.n_evictions;
    out->n_cells_evicted = st.n_cells_evicted;
    out->t_evict_us      = st.t_evict_us;
    out->n_compactions   = st.n_compactions;
    out->t_compact_us    = st.t_compact_us;
    out->n_move_events   = st.n_move_events;
    out->n_bytes_moved   = st.n_bytes_moved;
    out->t_move_us       = st.t_move_us;
    out->n_lazy_flushes  = st.n_lazy_flushes;
    out->n_lazy_queries  = st.n_lazy_queries;
    out->t_lazy_us       = st.t_lazy_us;
    out->n_host_moves    = st.n_host_moves;
    out->n_cells_used    = 0;
    if (const llama_kv_cache * kv = llama_kv_score_access::get_kv(lctx)) {
        out->n_cells_used = llama_kv_score_access::n_cells_used(*kv);
    }
    return 0;
}

void llama_kv_policy_reset_stats(struct llama_context * ctx) {
    if (ctx == nullptr) {
        return;
    }
    auto & st = llama_kv_score_access::state(*ctx);
    st.n_evictions     = 0;
    st.n_cells_evicted = 0;
    st.t_evict_us      = 0;
    st.n_compactions   = 0;
    st.t_compact_us    = 0;
    st.n_move_events   = 0;
    st.n_bytes_moved   = 0;
    st.t_move_us       = 0;
    st.n_lazy_flushes  = 0;
    st.n_lazy_queries  = 0;
    st.n_host_moves    = 0;
    st.t_lazy_us       = 0;
}

int32_t llama_kv_policy_evict(struct llama_context * ctx, llama_seq_id seq_id, int32_t n_free) {
    if (ctx == nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    return llama_kv_score_access::evict_seq(*ctx, seq_id, n_free);
}

int32_t llama_kv_policy_compact(struct llama_context * ctx, llama_seq_id seq_id) {
    if (ctx == nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    return llama_kv_score_access::compact_seq(*ctx, seq_id);
}

int32_t llama_kv_policy_n_head_kv(const struct llama_context * ctx) {
    if (ctx == nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    const llama_kv_cache * kv = llama_kv_score_access::get_kv(*ctx);
    return kv ? llama_kv_score_access::n_head_kv(*kv) : 0;
}

int32_t llama_kv_policy_head_scores(struct llama_context * ctx, llama_seq_id seq_id, int32_t capacity,
                                    llama_pos * pos_out, float * scores_out) {
    if (ctx == nullptr || capacity < 0) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    return llama_kv_score_access::head_scores(*ctx, seq_id, capacity, pos_out, scores_out);
}

int32_t llama_kv_policy_compress(struct llama_context * ctx, llama_seq_id seq_id, int32_t n_keep) {
    if (ctx == nullptr || n_keep < 0) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    return llama_kv_score_access::compress_seq(*ctx, seq_id, n_keep);
}

int32_t llama_kv_policy_default_positions(const struct llama_context * ctx) {
    if (ctx == nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    if (llama_kv_score_access::compact_error(*ctx, 0) != 0) {
        return LLAMA_KV_POSITIONS_ABSOLUTE;
    }
    const auto & c = llama_kv_score_access::cfg(const_cast<llama_context &>(*ctx));
    return c.scored() && c.granularity() != LLAMA_KV_GRANULARITY_TOKEN ? LLAMA_KV_POSITIONS_TRAINING
                                                                        : LLAMA_KV_POSITIONS_CACHE;
}

int32_t llama_kv_policy_wants_compaction(const struct llama_context * ctx, llama_seq_id seq_id,
                                         const struct llama_kv_positions_state * state,
                                         llama_pos next_pos, int32_t n_new) {
    if (ctx == nullptr || state == nullptr || n_new < 0 || next_pos < 0 ||
        state->mode < LLAMA_KV_POSITIONS_CACHE || state->mode > LLAMA_KV_POSITIONS_ABSOLUTE) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    if (state->mode == LLAMA_KV_POSITIONS_ABSOLUTE) {
        return 0;
    }
    const int32_t n_cells = llama_kv_policy_n_cells(ctx, seq_id);
    if (n_cells < 0) {
        return n_cells;
    }
    // a gap after the newest cell: only a compaction lets the next batch continue the sequence
    const llama_pos pos_max = llama_memory_seq_pos_max(llama_get_memory(ctx), seq_id);
    if (0 <= (int64_t) pos_max + 1 && (int64_t) pos_max + 1 < next_pos) {
        return 1;
    }
    const int64_t end   = (int64_t) next_pos + n_new;
    const int64_t train = state->n_ctx_train > 0 ? state->n_ctx_train : INT64_MAX;
    if (state->mode == LLAMA_KV_POSITIONS_TRAINING) {
        return end > train ? 1 : 0;
    }
    const int64_t bound = state->n_cells <= 0 ? 0 :
        std::min(train, std::max(2*state->n_cells, state->next_after + state->n_cells));
    return end > bound && (int64_t) n_cells + state->n_unheld < next_pos ? 1 : 0;
}
