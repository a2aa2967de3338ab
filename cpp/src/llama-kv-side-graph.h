// a2sf: the host inputs of the engine's small side graphs (moves, per-unit RoPE,
// lazy scoring), filled from host vectors when the graph runs. The graphs themselves
// run through llama_kv_score_access::compute_side_graph (llama-kv-move.cpp).
#pragma once

#include "llama-graph.h"

#include "ggml-backend.h"

#include <cstdint>
#include <utility>
#include <vector>

// the input of type T that an earlier layer of the graph being built added (nullptr: none yet);
// the scoring inputs are shared by every layer of a graph
template <typename T>
T * find_graph_input(llm_graph_result * res) {
    for (auto & in : res->inputs) {
        if (auto * p = dynamic_cast<T *>(in.get())) {
            return p;
        }
    }
    return nullptr;
}

struct llm_graph_input_side : public llm_graph_input_i {
    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        set(i32);
        set(i64);
        set(f32);
    }

    std::vector<std::pair<ggml_tensor *, std::vector<int32_t>>> i32; // e.g. get_rows: source rows
    std::vector<std::pair<ggml_tensor *, std::vector<int64_t>>> i64; // e.g. set_rows: destination rows
    std::vector<std::pair<ggml_tensor *, std::vector<float>>>   f32; // e.g. masks and weights

private:
    template <typename T>
    static void set(const std::vector<std::pair<ggml_tensor *, std::vector<T>>> & v) {
        for (const auto & [t, data] : v) {
            ggml_backend_tensor_set(t, data.data(), 0, data.size()*sizeof(T));
        }
    }
};
