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
// from the returned one on.
//
// iSWA memory (Gemma 2/3): the base (global-layer) cache is renumbered as above;
// the SWA cache, whose window is a run of the newest positions, is shifted by one
// delta so that its newest cell lands on the base's newest position. Distances
// inside the window -- all an SWA layer sees of positions, under RoPE and its
// window mask -- are unchanged, so the SWA layers compute exactly what they did.
// When the window holds more tokens than the base cache (a window wider than
// n_ctx), the base positions start at off = window - n instead of 0, so that no
// window cell would need a negative position; the return value is then off + n.
// Cells already outside the window drop out (a negative position frees them).
// With per-head cells (compact_units) the window's positions join the numbering, so
// they stay a run of consecutive positions and the window again takes one delta.

#include "llama-kv-score.h"

#include "llama-context.h"
#include "llama-hparams.h"
#include "llama-kv-cache.h"
#include "llama-kv-policy.h"

#include "ggml.h"

#include <algorithm>
#include <vector>

llama_kv_score_access::swa_seq_cells llama_kv_score_access::gather_swa(llama_kv_cache & swa, int32_t seq_id) {
    swa_seq_cells w;
    w.cells = &swa.v_cells[swa.seq_to_stream.empty() ? 0 : swa.seq_to_stream[seq_id]];
    auto & sc = *w.cells;
    w.pos_max = sc.seq_pos_max(seq_id);
    for (uint32_t c = 0; c < sc.size(); ++c) {
        if (!sc.is_empty(c) && sc.seq_has(c, seq_id)) {
            w.all.emplace_back(sc.pos_get(c), c);
            if (!llama_hparams::is_masked_swa(swa.n_swa, swa.swa_type, sc.pos_get(c), w.pos_max + 1)) {
                w.window.push_back(sc.pos_get(c));
            }
        }
    }
    std::sort(w.all.begin(), w.all.end());
    std::sort(w.window.begin(), w.window.end());
    return w;
}

namespace {

using swa_seq_cells = llama_kv_score_access::swa_seq_cells;

bool swa_shared(const swa_seq_cells & w) {
    for (const auto & pc : w.all) {
        if (w.cells->seq_count(pc.second) > 1) {
            return true;
        }
    }
    return false;
}

// one delta for every cell of the window (ascending: d < 0 moves every cell down); a cell
// below position 0 (out of the window) is freed
void shift_swa(swa_seq_cells & w, llama_pos d) {
    for (const auto & pc : w.all) {
        w.cells->pos_add(pc.second, d);
    }
}

} // namespace

bool llama_kv_score_access::quantized_k_unrotated(const llama_kv_cache & kv) {
    for (const auto & layer : kv.layers) {
        if (layer.k != nullptr && ggml_is_quantized(layer.k->type) && !kv.attn_rot_k) {
            return true;
        }
    }
    return false;
}

int32_t llama_kv_score_access::compact_error(const llama_context & lctx, int32_t seq_id) {
    const llama_kv_cache * kv = get_kv(lctx);
    if (kv == nullptr || kv->other != nullptr) {
        return LLAMA_KV_POLICY_ERR_MEMORY;
    }
    if (!valid_seq(*kv, seq_id)) {
        return LLAMA_KV_POLICY_ERR_SEQ;
    }
    // learned absolute positions (OPT, GPT-2) and multi-position RoPE cannot be re-rotated;
    // nor can a quantized K that llama.cpp stores without its Hadamard rotation (head_dim
    // not a multiple of 64, or LLAMA_ATTN_ROT_DISABLE): its K-shift graph dereferences the
    // missing rotation matrix
    if (kv->hparams.rope_type == LLAMA_ROPE_TYPE_NONE || !kv->get_can_shift() || quantized_k_unrotated(*kv)) {
        return LLAMA_KV_POLICY_ERR_SHIFT;
    }
    // iSWA: one delta keeps a standard window's distances; a chunked window (aligned to
    // multiples of n_swa) or a symmetric one would change which tokens it holds
    const llama_kv_cache * swa = get_swa(lctx);
    if (swa != nullptr && (swa->other != nullptr || !swa->get_can_shift() || quantized_k_unrotated(*swa) ||
                           swa->swa_type != LLAMA_SWA_TYPE_STANDARD ||
                           !valid_seq(*swa, seq_id))) {
        return LLAMA_KV_POLICY_ERR_SHIFT;
    }
    return 0;
}

int32_t llama_kv_score_access::compact_seq(llama_context & lctx, int32_t seq_id) {
    if (const int32_t err = compact_error(lctx, seq_id)) {
        return err;
    }
    llama_kv_cache * kv  = get_kv(lctx);
    llama_kv_cache * swa = get_swa(lctx);
    flush_lazy(lctx, *kv);

    const uint32_t strm = kv->seq_to_stream.empty() ? 0 : kv->seq_to_stream[seq_id];
    auto & cells = kv->v_cells[strm];

    // after layer/head granularity moved tokens, a cell holds tokens of different
    // positions per head: one shift per cell cannot renumber them, each unit is renumbered
    // and re-rotated on its own
    llama_kv_units & u = kv->a2sf_units;
    if (u.allocated() && u.diverged[strm]) {
        return compact_units(lctx, *kv, strm, seq_id, swa);
    }

    // the sequence's cells in position order
    const auto order = cells_by_pos(cells, seq_id);

    const int32_t n = (int32_t) order.size();

    // iSWA: the SWA cache's cells of the sequence, and the run of them inside the window
    swa_seq_cells w;
    if (swa != nullptr) {
        w = gather_swa(*swa, seq_id);
    }
    const int32_t n_window = (int32_t) w.window.size();
    const int32_t off = std::max(0, n_window - n); // first base position

    // a cell shared with another sequence holds one position for all of them:
    // it may only stay where it is (a shared prefix that was never evicted does)
    for (int32_t i = 0; i < n; ++i) {
        if (order[i].first != off + i && cells.seq_count(order[i].second) > 1) {
            return LLAMA_KV_POLICY_ERR_SHARED;
        }
    }
    const llama_pos d_swa = w.all.empty() ? 0 : (off + n - 1) - w.pos_max;
    if (d_swa != 0 && swa_shared(w)) {
        return LLAMA_KV_POLICY_ERR_SHARED;
    }

    const int64_t t0 = ggml_time_us();

    // ascending: cell i moves down to position off + i <= its old one, below every cell
    // not yet moved, so no two cells of the sequence ever share a position
    bool moved = false;
    for (int32_t i = 0; i < n; ++i) {
        const llama_pos d = off + i - order[i].first;
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

    if (d_swa != 0) {
        shift_swa(w, d_swa);
        moved = true;
    }

    if (moved) {
        lctx.synchronize();
        lctx.memory_update(false); // the K-shift graph, now
    }

    auto & st = lctx.kv_score;
    st.n_compactions += moved;
    st.t_compact_us  += ggml_time_us() - t0;

    return off + n;
}

// Per-unit compaction (granularity LAYER / HEAD after tokens moved): the units hold
// different tokens per cell, so each K row is re-rotated by its own delta (llama-kv-move.cpp:
// one rope graph per layer, a shift per (cell, head) row).
//
// One numbering serves every unit: the positions that any unit holds, in order, become
// 0..m-1 (m <= n_units*n), so a token keeps the same position in every head that holds it,
// as in the uncompacted cache. Renumbering each unit 0..n-1 on its own closes each head's
// gaps differently, so the heads of a layer disagree about distances; measured on a 16k
// SmolLM2 stream at 256 cells that cost 7-11% perplexity, growing with the number of
// compactions, where one numbering costs nothing (tokens renumbered per head: x1.072-1.112
// vs a fresh context; never compacted below the training context: x1.006).
// Only when m would leave less than one cache of positions below the training context does
// each unit take 0..n-1 (bounded, the cost above).
// A cell's llama.cpp position becomes the one its first unit's token got: the newest token
// (held in the same cell by every unit) ends at m-1, so the mask and the next batch agree.
//
// iSWA (swa != nullptr): the positions inside the sliding window join the numbering. They
// are a run of consecutive positions ending at the newest token, so their new numbers are
// consecutive too and the whole window shifts by one delta (llama.cpp's K-shift of the SWA
// cache), keeping every distance an SWA layer sees; the global units' tokens in the window
// get the same numbers as the window's. With a window the numbering is always the one list
// (each unit's own 0..n-1 would break the window's single delta).
int32_t llama_kv_score_access::compact_units(llama_context & lctx, llama_kv_cache & kv, uint32_t strm, int32_t seq_id,
                                             llama_kv_cache * swa) {
    auto & cells = kv.v_cells[strm];
    llama_kv_units & u = kv.a2sf_units;

    if (cells.get_has_shift()) {
        lctx.memory_update(false); // pending K-shifts first: this one replaces llama.cpp's
    }

    std::vector<uint32_t> mine;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if (!cells.is_empty(c) && cells.seq_has(c, seq_id)) {
            if (cells.seq_count(c) > 1) {
                return LLAMA_KV_POLICY_ERR_SHARED;
            }
            mine.push_back(c);
        }
    }
    const int32_t n = (int32_t) mine.size();

    swa_seq_cells w;
    if (swa != nullptr) {
        w = gather_swa(*swa, seq_id);
        if (swa_shared(w)) {
            return LLAMA_KV_POLICY_ERR_SHARED;
        }
    }

    const int64_t t0 = ggml_time_us();

    // the positions any unit holds, and the window's, in order: one numbering for all (see above)
    std::vector<int32_t> held(w.window.begin(), w.window.end());
    held.reserve(held.size() + (size_t) u.n_units()*mine.size());
    for (uint32_t k = 0; k < u.n_units(); ++k) {
        for (uint32_t c : mine) {
            held.push_back(u.pos[u.at(strm, k, c)]);
        }
    }
    std::sort(held.begin(), held.end());
    held.erase(std::unique(held.begin(), held.end()), held.end());
    const int64_t n_train  = (int64_t) kv.hparams.n_ctx_train;
    const bool    one_list = swa != nullptr || n_train <= 0 || (int64_t) held.size() + (int64_t) cells.size() <= n_train;
    const int32_t m        = one_list ? (int32_t) held.size() : n;
    const auto rank = [&](int32_t p) { return (int32_t) (std::lower_bound(held.begin(), held.end(), p) - held.begin()); };

    // the window's one delta; its positions are consecutive, so every one of them gets it
    llama_pos d_swa = 0;
    if (!w.window.empty()) {
        d_swa = rank(w.window.front()) - w.window.front();
        for (llama_pos p : w.window) {
            if (rank(p) - p != d_swa) {
                return LLAMA_KV_POLICY_ERR_STATE; // a hole inside the window: not llama.cpp's SWA cache
            }
        }
    }

    std::vector<std::vector<int32_t>> deltas(u.n_units(), std::vector<int32_t>(cells.size(), 0));
    std::vector<std::vector<int32_t>> renum(u.n_units(), std::vector<int32_t>(cells.size(), -1));
    bool moved = false;
    for (uint32_t k = 0; k < u.n_units(); ++k) {
        std::vector<std::pair<int32_t, uint32_t>> order;
        for (uint32_t c : mine) {
            order.emplace_back(u.pos[u.at(strm, k, c)], c);
        }
        std::sort(order.begin(), order.end());
        for (int32_t i = 0; i < n; ++i) {
            const uint32_t c = order[i].second;
            const int32_t  p = one_list ? rank(order[i].first) : i;
            deltas[k][c] = p - order[i].first;
            renum[k][c]  = p;
            moved |= deltas[k][c] != 0;
        }
    }
    if (!moved && d_swa == 0) {
        return m;
    }
    if (moved && !rotate_unit_rows(lctx, kv, strm, deltas)) {
        return LLAMA_KV_POLICY_ERR_STATE;
    }
    for (uint32_t k = 0; k < u.n_units(); ++k) {
        for (uint32_t c : mine) {
            u.pos[u.at(strm, k, c)] = renum[k][c];
        }
    }
    // the cells' own positions: unit 0's; K is already rotated, so no K-shift may follow
    for (uint32_t c : mine) {
        const llama_pos d = renum[0][c] - cells.pos_get(c);
        if (d != 0) {
            cells.pos_add(c, d);
        }
    }
    cells.reset_shift();

    if (d_swa != 0) {
        shift_swa(w, d_swa);
        lctx.synchronize();
        lctx.memory_update(false); // the SWA cache's K-shift, now (the base has none pending)
    }

    auto & st = lctx.kv_score;
    st.n_compactions++;
    st.t_compact_us += ggml_time_us() - t0;
    return m;
}
