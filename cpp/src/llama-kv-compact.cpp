// a2sf: position compaction, so that a bounded cache can stream past the model's
// training context.
//
// Eviction frees cells but never moves a position, so the positions of a long
// stream keep growing although the cache holds a few hundred cells; past the
// training length a RoPE model stops working (measured: x28-37 perplexity at 2x).
// Compaction renumbers the cells of one sequence 0..n-1 in position order (sinks
// first, newest last) and lets llama.cpp's own K-shift re-rotate each cell's K by
// its change of position (llama_kv_cells::pos_add + the shift graph of
// llama_kv_cache::update), exactly what llama-server's context shift does with a
// single delta. The shift is applied at once, so a state saved or scores read
// right after a compaction see K and positions that agree.
//
// Scores, value norms and cells are untouched: a cell keeps its token, only its
// position changes. The caller (a2sf.Llama) gives the next tokens the positions
// after the returned one.

#include "llama-kv-score.h"

#include "llama-context.h"
#include "llama-hparams.h"
#include "llama-kv-cache.h"
#include "llama-kv-policy.h"

#include "ggml.h"

#include <algorithm>
#include <vector>

int32_t llama_kv_score_access::compact_seq(llama_context & lctx, int32_t seq_id) {
    llama_kv_cache * kv = get_kv(lctx);
    if (kv == nullptr || kv->other != nullptr) {
        return LLAMA_KV_POLICY_ERR_MEMORY;
    }
    if (!valid_seq(*kv, seq_id)) {
        return LLAMA_KV_POLICY_ERR_SEQ;
    }
    // learned absolute positions (OPT, GPT-2) and multi-position RoPE cannot be re-rotated
    if (kv->hparams.rope_type == LLAMA_ROPE_TYPE_NONE || !kv->get_can_shift()) {
        return LLAMA_KV_POLICY_ERR_SHIFT;
    }

    const uint32_t strm = kv->seq_to_stream.empty() ? 0 : kv->seq_to_stream[seq_id];
    auto & cells = kv->v_cells[strm];

    // after layer/head granularity moved tokens, a cell holds tokens of different
    // positions per head: one shift per cell cannot renumber them
    llama_kv_units & u = kv->a2sf_units;
    if (u.allocated() && u.diverged[strm]) {
        return LLAMA_KV_POLICY_ERR_STATE;
    }

    // the sequence's cells in position order
    std::vector<std::pair<llama_pos, uint32_t>> order;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if (!cells.is_empty(c) && cells.seq_has(c, seq_id)) {
            order.emplace_back(cells.pos_get(c), c);
        }
    }
    std::sort(order.begin(), order.end());

    const int32_t n = (int32_t) order.size();

    // a cell shared with another sequence holds one position for all of them:
    // it may only stay where it is (a shared prefix that was never evicted does)
    for (int32_t i = 0; i < n; ++i) {
        if (order[i].first != i && cells.seq_count(order[i].second) > 1) {
            return LLAMA_KV_POLICY_ERR_SHARED;
        }
    }

    const int64_t t0 = ggml_time_us();

    // ascending: cell i moves down to position i <= its old one, below every cell
    // not yet moved, so no two cells of the sequence ever share a position
    bool moved = false;
    for (int32_t i = 0; i < n; ++i) {
        const llama_pos d = i - order[i].first;
        if (d != 0) {
            cells.pos_add(order[i].second, d);
            moved = true;
            if (u.allocated()) {
                for (uint32_t k = 0; k < u.n_units(); ++k) {
                    u.pos[u.at(strm, k, order[i].second)] += d;
                }
            }
        }
    }

    if (moved) {
        lctx.synchronize();
        lctx.memory_update(false); // the K-shift graph, now
    }

    auto & st = lctx.kv_score;
    st.n_compactions += moved;
    st.t_compact_us  += ggml_time_us() - t0;

    return n;
}
