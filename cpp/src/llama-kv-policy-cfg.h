// a2sf: the eviction policy a context runs with.
//
// Kept in llama_cparams so that the graph builder sees it and so that changing
// it invalidates llama.cpp's graph reuse (llm_graph_params::allow_reuse compares it).
#pragma once

#include "llama-kv-policy.h"

#include <cmath>
#include <cstdint>
#include <vector>

// The engine's defaults: what llama_kv_policy_default_params() returns and what a
// context starts with (kind NONE: vanilla llama.cpp), each row's default of
// llama-kv-policy-settings.def.
inline llama_kv_policy_params llama_kv_policy_defaults() {
    llama_kv_policy_params p = {};
    p.kind = LLAMA_KV_POLICY_NONE;
#define LLAMA_KV_SETTING(name, ctype, type, min, max, auto_, def, ...) p.name = static_cast<ctype>(def);
#include "llama-kv-policy-settings.def"
#undef LLAMA_KV_SETTING
    return p;
}

struct llama_kv_policy_cfg {
    // the settings as llama_kv_policy_set accepted them (validated there, kind included)
    llama_kv_policy_params params = llama_kv_policy_defaults();

    enum llama_kv_policy_kind kind() const { return static_cast<enum llama_kv_policy_kind>(params.kind); }

    enum llama_kv_granularity granularity() const { return static_cast<enum llama_kv_granularity>(params.granularity); }

    // the scores are accumulated in the compute graph only for score-ranked policies
    bool scored() const { return kind() == LLAMA_KV_POLICY_SCORE; }

    // the newest positions an eviction keeps among n_cells cells when freeing n_free:
    // n_recent, or with LLAMA_KV_RECENT_HALF half of what is kept after the n_sink oldest
    // (the budget split of H2O's and A2SF's code: half recent window, half selected)
    int32_t n_recent_for(int32_t n_cells, int32_t n_free) const {
        if (params.n_recent >= 0) {
            return params.n_recent;
        }
        const int32_t n_sink = n_cells < params.n_sink ? n_cells : params.n_sink;
        const int32_t kept   = n_cells - n_free - n_sink;
        return kept > 0 ? kept/2 : 0;
    }

    // Bounded scoring for alpha < 1: of n queries of one sequence, query t weighs
    // alpha^(n-1-t), so the ones before the last k add at most n_group*alpha^k/(1-alpha)
    // to any cell's score: a share alpha^k <= bounded_scoring_tol of the largest score a
    // cell can carry, n_group/(1-alpha) (every query's probability at most 1). The last k
    // of n that count (TOVA: 1; H2O: all; alpha = 0.95: 225).
    static constexpr double bounded_scoring_tol = 1e-5;
    int64_t rows_that_count(int64_t n) const {
        const float alpha = params.forgetting_factor;
        if (alpha >= 1.0f) {
            return n;
        }
        if (alpha <= 0.0f) {
            return n < 1 ? n : 1;
        }
        const double k = std::ceil(std::log(bounded_scoring_tol)/std::log((double) alpha));
        const int64_t ki = k < 1.0 ? 1 : (int64_t) k;
        return n < ki ? n : ki;
    }

    // alpha^k for k = 0..n: the query weights and cell decays of n queries
    std::vector<float> alpha_powers(size_t n) const {
        std::vector<float> pw(n + 1, 1.0f);
        for (size_t k = 1; k <= n; ++k) {
            pw[k] = pw[k - 1]*params.forgetting_factor;
        }
        return pw;
    }

    // decode steps with flash attention store their queries for one batched product
    bool lazy_decode() const {
        return scored() && (params.decode_scoring == LLAMA_KV_DECODE_SCORING_LAZY ||
                            params.decode_scoring == LLAMA_KV_DECODE_SCORING_AUTO);
    }
    // decode steps of a cache in host memory are scored in their own graph (auto)
    bool eager_host_decode() const { return params.decode_scoring == LLAMA_KV_DECODE_SCORING_AUTO; }

    // the engine tracks what each (layer, head) holds in each cell (llama_kv_units)
    bool tracks_units() const { return scored() && (granularity() != LLAMA_KV_GRANULARITY_TOKEN || params.mean_attention); }

    // every field of the table, and the kind
    bool operator==(const llama_kv_policy_cfg & o) const {
        const auto & a = params;
        const auto & b = o.params;
        return a.kind == b.kind
#define LLAMA_KV_SETTING(name, ...) && a.name == b.name
#include "llama-kv-policy-settings.def"
#undef LLAMA_KV_SETTING
            ;
    }
    bool operator!=(const llama_kv_policy_cfg & o) const { return !(*this == o); }
};
