// a2sf: prompt compression -- after a prompt was read with full attention, keep
// n_keep cells of the sequence by the policy's ranking (its granularity), then move
// the kept cells to the front of the stream.
//
// The scores of a whole prompt are what the methods' reference code selects with
// (A2SF's utils_real_drop, kvpress's presses, SnapKV); continuous eviction only ever
// sees a prefix. Eviction alone would leave the kept cells scattered over the
// prompt's span, and llama.cpp attends over cells [0, used_max_p1): moving them to
// cells [0, n) makes decoding cost n cells, not the prompt's length. Positions are
// not touched (every kept token is older than the next query).

#include "llama-kv-score.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-policy.h"
#include "llama-model.h"

#include <algorithm>

bool llama_kv_score_access::uses_alibi(const llama_context & lctx) {
    return lctx.model.hparams.use_alibi || lctx.model.hparams.f_max_alibi_bias > 0.0f;
}

int32_t llama_kv_score_access::compress_seq(llama_context & lctx, int32_t seq_id, int32_t n_keep) {
    llama_kv_cache * kv = get_kv(lctx);
    if (kv == nullptr || kv->other != nullptr) {
        return LLAMA_KV_POLICY_ERR_MEMORY;
    }
    if (!valid_seq(*kv, seq_id)) {
        return LLAMA_KV_POLICY_ERR_SEQ;
    }
    flush_lazy(lctx, *kv);
    const uint32_t strm  = kv->seq_to_stream.empty() ? 0 : kv->seq_to_stream[seq_id];
    auto &         cells = kv->v_cells[strm];

    // moving cells to the front rewrites cells other sequences may read
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if (!cells.is_empty(c) && (!cells.seq_has(c, seq_id) || cells.seq_count(c) > 1)) {
            return LLAMA_KV_POLICY_ERR_STATE;
        }
    }
    if (cells.get_has_shift()) {
        lctx.memory_update(false); // pending K-shifts first: moved cells carry no shift
    }

    const int32_t n_now = n_cells(*kv, seq_id);
    if (n_now > n_keep) {
        const int32_t freed = evict_seq(lctx, seq_id, n_now - n_keep);
        if (freed < 0) {
            return freed;
        }
    }

    const int64_t t0 = ggml_time_us();

    // kept cells at or past n move, in position order, into the free cells below n
    const int32_t n = n_cells(*kv, seq_id);
    std::vector<std::pair<llama_pos, uint32_t>> late;
    std::vector<uint32_t> holes;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if ((int32_t) c < n && cells.is_empty(c)) {
            holes.push_back(c);
        } else if ((int32_t) c >= n && !cells.is_empty(c)) {
            late.emplace_back(cells.pos_get(c), c);
        }
    }
    std::sort(late.begin(), late.end());
    GGML_ASSERT(late.size() == holes.size());
    if (late.empty()) {
        return n;
    }

    const uint32_t nh      = std::max<int32_t>(1, n_head_kv(*kv));
    const uint32_t n_units = (uint32_t) n_scored_layers(*kv)*nh;
    std::vector<std::pair<uint32_t, uint32_t>> pairs;
    for (size_t i = 0; i < late.size(); ++i) {
        pairs.emplace_back(late[i].second, holes[i]);
    }
    const std::vector<std::vector<std::pair<uint32_t, uint32_t>>> moves(n_units, pairs);
    if (!move_unit_rows(lctx, *kv, strm, moves)) {
        return LLAMA_KV_POLICY_ERR_STATE;
    }

    // the cells' own metadata, and the unit map, follow their rows
    llama_kv_units & u = kv->a2sf_units;
    for (const auto & [src, dst] : pairs) {
        const llama_pos p = cells.pos_get(src);
        cells.rm(src);
        cells.pos_set(dst, p);
        cells.seq_add(dst, seq_id);
        if (u.allocated()) {
            for (uint32_t k = 0; k < u.n_units(); ++k) {
                u.pos[u.at(strm, k, dst)]  = u.pos[u.at(strm, k, src)];
                u.born[u.at(strm, k, dst)] = u.born[u.at(strm, k, src)];
            }
        }
    }
    kv->v_heads[strm] = (uint32_t) n;

    lctx.kv_score.t_evict_us += ggml_time_us() - t0;
    return n;
}
