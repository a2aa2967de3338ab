// a2sf: the eviction policy a context runs with.
//
// Kept in llama_cparams so that the graph builder sees it and so that changing
// it invalidates llama.cpp's graph reuse (llm_graph_params::allow_reuse compares it).
#pragma once

#include <cstdint>

struct llama_kv_policy_cfg {
    int32_t  kind              = 0;     // enum llama_kv_policy_kind (0 = none)
    float    forgetting_factor = 0.95f; // alpha
    bool     value_aware       = false; // VATP
    int32_t  n_sink            = 4;
    int32_t  n_recent          = 32;
    int32_t  evict_chunk       = 16;
    uint32_t seed              = 0;

    // the scores are accumulated in the compute graph only for score-ranked policies
    bool scored() const { return kind == 2; }

    bool operator==(const llama_kv_policy_cfg & o) const {
        return kind == o.kind && forgetting_factor == o.forgetting_factor && value_aware == o.value_aware &&
               n_sink == o.n_sink && n_recent == o.n_recent && evict_chunk == o.evict_chunk && seed == o.seed;
    }
    bool operator!=(const llama_kv_policy_cfg & o) const { return !(*this == o); }
};
