// a2sf: the C API of the eviction engine (cpp/include/llama-kv-policy.h).
//
// Every function validates what it is given and returns an error code: nothing
// a caller passes may reach a GGML_ASSERT.

#include "llama-kv-policy.h"
#include "llama-kv-score.h"

#include "llama-context.h"
#include "llama-kv-cache.h"

#include <cmath>

struct llama_kv_policy_params llama_kv_policy_default_params(void) {
    return llama_kv_policy_defaults();
}

int32_t llama_kv_policy_set(struct llama_context * ctx, const struct llama_kv_policy_params * params) {
    if (ctx == nullptr || params == nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    const auto & p = *params;
    if (p.kind < LLAMA_KV_POLICY_NONE || p.kind > LLAMA_KV_POLICY_RANDOM) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    if (!std::isfinite(p.forgetting_factor) || p.forgetting_factor < 0.0f || p.forgetting_factor > 1.0f) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    if (p.n_sink < 0 || p.n_recent < LLAMA_KV_RECENT_HALF || p.evict_chunk < 0) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    if (p.granularity < LLAMA_KV_GRANULARITY_AUTO || p.granularity > LLAMA_KV_GRANULARITY_HEAD) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    if (p.decode_scoring < LLAMA_KV_DECODE_SCORING_EAGER || p.decode_scoring > LLAMA_KV_DECODE_SCORING_AUTO) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    if (p.pool_kernel < 1 || p.pool_kernel > LLAMA_KV_POOL_KERNEL_MAX) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }

    llama_kv_cache * kv = llama_kv_score_access::get_kv(*ctx);
    if (p.kind != LLAMA_KV_POLICY_NONE && kv == nullptr) {
        return LLAMA_KV_POLICY_ERR_MEMORY;
    }

    llama_kv_policy_cfg c;
    c.params = p;
    if (p.granularity == LLAMA_KV_GRANULARITY_AUTO) {
        // per (layer, KV head) selection is what makes scores beat recency (README, "Which
        // policy should I use"); token where per-head moves cannot be exact (ALiBi), or where a
        // head's row of K is not whole blocks of a quantized type (a head's row cannot move alone)
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
