// a2sf: eviction of the lowest-ranked cells when a batch finds no free KV slot.
//
// Two steps. Ranking: each group of (layer, KV head) units that keeps the same
// tokens (all of them for granularity TOKEN and the unscored policies, a layer
// for LAYER, a head for HEAD) has its candidates ranked by the policy's scorer
// (llama-kv-scorer.h) and names its victims. The n_sink oldest and n_recent
// newest tokens of a sequence are never candidates.
// Freeing: one set of cells is freed for all units; with several groups each
// group's kept tokens in that set first move into its own victims' cells
// (llama-kv-move.cpp), so every unit occupies the same cells again and
// llama.cpp's one KQ mask stays valid. No position is shifted.

#include "llama-kv-score.h"
#include "llama-kv-scorer.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-policy.h"

#include "ggml-backend.h"

#include <algorithm>
#include <map>
#include <vector>

llama_kv_cache * llama_kv_score_access::get_kv(const llama_context & lctx) {
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(lctx.memory.get())) {
        return iswa->get_base();
    }
    return dynamic_cast<llama_kv_cache *>(lctx.memory.get());
}

llama_kv_cache * llama_kv_score_access::get_swa(const llama_context & lctx) {
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(lctx.memory.get())) {
        return iswa->get_swa();
    }
    return nullptr;
}

llama_kv_policy_cfg & llama_kv_score_access::cfg(llama_context & lctx) {
    return lctx.cparams.kv_policy;
}

llama_kv_score_state & llama_kv_score_access::state(llama_context & lctx) {
    return lctx.kv_score;
}

void llama_kv_score_access::invalidate_graphs(llama_context & lctx) {
    for (auto & res : lctx.gf_res_prev) {
        if (res) {
            res->reset();
        }
    }
    lctx.gf_res_prev_active = nullptr;
    // the worst-case graph grows with the scoring ops: reserve it again
    lctx.sched_need_reserve = true;
}

bool llama_kv_score_access::valid_seq(const llama_kv_cache & kv, int32_t seq_id) {
    return seq_id >= 0 && (size_t) seq_id < std::max<size_t>(kv.seq_to_stream.size(), 1) &&
           (uint32_t) seq_id < std::max<uint32_t>(kv.n_seq_max, 1);
}

static uint32_t stream_of(const std::vector<uint32_t> & seq_to_stream, int32_t seq_id) {
    return seq_to_stream.empty() ? 0 : seq_to_stream[seq_id];
}

std::vector<ggml_tensor *> llama_kv_score_access::scored_layers(const llama_kv_cache & kv) {
    std::vector<ggml_tensor *> res;
    for (const auto & layer : kv.layers) {
        if (layer.score) {
            res.push_back(layer.score);
        }
    }
    return res;
}

bool llama_kv_score_access::unit_rows_whole_blocks(const llama_kv_cache & kv) {
    for (const auto & layer : kv.layers) {
        if (layer.score == nullptr) {
            continue;
        }
        if (layer.k && kv.hparams.n_embd_head_k(layer.il) % ggml_blck_size(layer.k->type) != 0) {
            return false;
        }
        if (layer.v && kv.hparams.n_embd_head_v(layer.il) % ggml_blck_size(layer.v->type) != 0) {
            return false;
        }
    }
    return true;
}

std::vector<int32_t> llama_kv_score_access::scored_layer_ids(const llama_kv_cache & kv) {
    std::vector<int32_t> res;
    for (const auto & layer : kv.layers) {
        if (layer.score) {
            res.push_back((int32_t) layer.il);
        }
    }
    return res;
}

int32_t llama_kv_score_access::n_scored_layers(const llama_kv_cache & kv) {
    return (int32_t) scored_layers(kv).size();
}

int32_t llama_kv_score_access::n_cells(const llama_kv_cache & kv, int32_t seq_id) {
    const auto & cells = kv.v_cells[stream_of(kv.seq_to_stream, seq_id)];
    int32_t n = 0;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        n += !cells.is_empty(c) && cells.seq_has(c, seq_id);
    }
    return n;
}

int64_t llama_kv_score_access::n_cells_used(const llama_kv_cache & kv) {
    int64_t n = 0;
    for (const auto & cells : kv.v_cells) {
        n += cells.get_used();
    }
    return n;
}

std::vector<std::pair<int32_t, uint32_t>> llama_kv_score_access::cells_by_pos(const llama_kv_cells & cells, int32_t seq_id) {
    std::vector<std::pair<int32_t, uint32_t>> res;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if (!cells.is_empty(c) && cells.seq_has(c, seq_id)) {
            res.emplace_back(cells.pos_get(c), c);
        }
    }
    std::sort(res.begin(), res.end());
    return res;
}

// the cells of seq_id, ordered by position
static std::vector<kv_cell_rank> seq_cells(const llama_kv_cells & cells, llama_seq_id seq_id) {
    std::vector<kv_cell_rank> res;
    for (const auto & [p, c] : llama_kv_score_access::cells_by_pos(cells, seq_id)) {
        res.push_back({ c, p, 0.0f });
    }
    return res;
}

// one stream's scores of a scored layer, copied from wherever the layer lives:
// F32 [kv_size, n_head_kv] (head h of cell c at h*kv_size + c)
static std::vector<float> read_layer_scores(ggml_tensor * score, uint32_t strm) {
    std::vector<float> res(score->ne[0]*score->ne[1]);
    ggml_backend_tensor_get(score, res.data(), strm*score->nb[2], res.size()*sizeof(float));
    return res;
}

int32_t llama_kv_score_access::cells_for_read(llama_context & lctx, int32_t seq_id, int32_t capacity,
                                              llama_kv_cache *& kv, uint32_t & strm,
                                              std::vector<std::pair<int32_t, uint32_t>> & order) {
    kv = get_kv(lctx);
    if (kv == nullptr) {
        return LLAMA_KV_POLICY_ERR_MEMORY;
    }
    if (!valid_seq(*kv, seq_id)) {
        return LLAMA_KV_POLICY_ERR_SEQ;
    }
    lctx.synchronize();
    flush_lazy(lctx, *kv);
    strm  = stream_of(kv->seq_to_stream, seq_id);
    order = cells_by_pos(kv->v_cells[strm], seq_id);
    return (int32_t) order.size() > capacity ? LLAMA_KV_POLICY_ERR_CAPACITY : 0;
}

int32_t llama_kv_score_access::read_scores(llama_context & lctx, int32_t seq_id, int32_t capacity,
                                           int32_t * pos_out, int32_t * cell_out, float * scores_out) {
    llama_kv_cache * kv = nullptr;
    uint32_t strm = 0;
    std::vector<std::pair<int32_t, uint32_t>> order;
    if (const int32_t rc = cells_for_read(lctx, seq_id, capacity, kv, strm, order)) {
        return rc;
    }
    std::vector<kv_cell_rank> sc;
    for (const auto & [p, c] : order) {
        sc.push_back({ c, p, 0.0f });
    }
    const int32_t n = (int32_t) sc.size();

    for (int32_t i = 0; i < n; ++i) {
        if (pos_out)  { pos_out[i]  = sc[i].pos;  }
        if (cell_out) { cell_out[i] = sc[i].cell; }
    }

    if (scores_out) {
        // a cell's score in a layer: summed over the layer's KV heads
        const auto layers = scored_layers(*kv);
        for (size_t il = 0; il < layers.size(); ++il) {
            const auto s = read_layer_scores(layers[il], strm);
            const int64_t kv_size = layers[il]->ne[0];
            for (int32_t i = 0; i < n; ++i) {
                float t = 0.0f;
                for (int64_t h = 0; h < layers[il]->ne[1]; ++h) {
                    t += s[h*kv_size + sc[i].cell];
                }
                scores_out[il*n + i] = t;
            }
        }
    }

    return n;
}

namespace {

// A unit is one (scored layer, KV head) of a stream: k = layer*n_head_kv + head.
// A group is the units that keep the same tokens, ranked together.
using unit_group = std::vector<uint32_t>;

// (src, dst) cells per unit: the rows an eviction moves (llama-kv-move.cpp)
using unit_moves = std::vector<std::vector<std::pair<uint32_t, uint32_t>>>;

// The groups: all units in one (granularity TOKEN, every policy without scores, or no
// unit map: a cell then holds one token everywhere), one per layer (LAYER), one per unit (HEAD)
std::vector<unit_group> unit_groups(llama_kv_granularity gran, bool per_group, uint32_t n_layer,
                                    uint32_t n_head_kv, uint32_t n_units) {
    std::vector<unit_group> groups;
    if (!per_group) {
        groups.emplace_back();
        for (uint32_t unit = 0; unit < n_units; ++unit) {
            groups.back().push_back(unit);
        }
    } else if (gran == LLAMA_KV_GRANULARITY_LAYER) {
        for (uint32_t layer = 0; layer < n_layer; ++layer) {
            groups.emplace_back();
            for (uint32_t head = 0; head < n_head_kv; ++head) {
                groups.back().push_back(layer*n_head_kv + head);
            }
        }
    } else {
        for (uint32_t unit = 0; unit < n_units; ++unit) {
            groups.push_back({ unit });
        }
    }
    return groups;
}

// Moving tokens between cells would overwrite K/V that other sequences read: with several
// groups, the sequence's cells shared with another sequence are marked and stay where they are
std::vector<uint8_t> shared_cells(const llama_kv_cells & cells, const std::vector<kv_cell_rank> & seq, size_t n_groups) {
    std::vector<uint8_t> shared(cells.size(), 0);
    if (n_groups > 1) {
        for (const auto & c : seq) {
            shared[c.cell] = cells.seq_count(c.cell) > 1;
        }
    }
    return shared;
}

// The tokens a group holds in the sequence's cells, ordered by position. With a unit map,
// a cell holds the token of the group's first unit (all of the group's units hold the same)
std::vector<kv_cell_rank> group_cells(const std::vector<kv_cell_rank> & seq, const llama_kv_units * map,
                                      uint32_t strm, uint32_t first_unit) {
    std::vector<kv_cell_rank> res = seq;
    if (map == nullptr) {
        return res;
    }
    for (auto & c : res) {
        c.pos = map->pos[map->at(strm, first_unit, c.cell)];
    }
    // units that never moved a token hold the cells' own positions, already in order
    const auto by_pos = [](const kv_cell_rank & a, const kv_cell_rank & b) { return a.pos < b.pos; };
    if (!std::is_sorted(res.begin(), res.end(), by_pos)) {
        std::sort(res.begin(), res.end(), by_pos);
    }
    return res;
}

// Per group, its candidates: all of its tokens but its n_sink oldest and n_recent newest
// (the same window for every group) and the shared cells; ordered by position
std::vector<std::vector<kv_cell_rank>> group_candidates(const std::vector<kv_cell_rank> & seq,
                                                        const std::vector<unit_group> & groups,
                                                        const llama_kv_units * map, uint32_t strm,
                                                        const std::vector<uint8_t> & shared,
                                                        int32_t n_sink, int32_t n_recent) {
    const int32_t n_cells = (int32_t) seq.size();
    const int32_t n_old   = std::min(n_cells, n_sink);
    const int32_t n_new   = std::min(n_cells - n_old, n_recent);
    std::vector<std::vector<kv_cell_rank>> candidates(groups.size());
    for (size_t g = 0; g < groups.size(); ++g) {
        const auto held = group_cells(seq, map, strm, groups[g].empty() ? 0 : groups[g][0]);
        for (int32_t i = n_old; i < n_cells - n_new; ++i) {
            if (!shared[held[i].cell]) {
                candidates[g].push_back(held[i]);
            }
        }
    }
    return candidates;
}

// what the scorers read of the stream: the unit map, and the scores when the scorer reads them
llama_kv_scorer_inputs scorer_inputs(const llama_kv_cache & kv, const llama_kv_units & map, uint32_t strm,
                                     llama_seq_id seq_id, uint32_t n_head_kv, uint32_t kv_size, bool with_scores) {
    llama_kv_scorer_inputs in;
    if (with_scores) {
        for (ggml_tensor * layer_scores : llama_kv_score_access::scored_layers(kv)) {
            in.scores.push_back(read_layer_scores(layer_scores, strm));
        }
    }
    in.n_head_kv = n_head_kv;
    in.kv_size   = kv_size;
    in.strm      = strm;
    if (map.allocated()) {
        in.units     = &map;
        in.n_queries = map.n_queries.count(seq_id) ? map.n_queries.at(seq_id) : 0;
    }
    return in;
}

// A group's victims: the cells of its n_free lowest ranks, lowest first; ties go to the
// older token. A unit holds each position once, so (rank, pos) orders the candidates
// totally and selecting them needs no full sort (cand is reordered)
std::vector<uint32_t> lowest_ranked(std::vector<kv_cell_rank> & cand, int32_t n_free) {
    const auto by_rank = [](const kv_cell_rank & a, const kv_cell_rank & b) {
        return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
    };
    if (n_free < (int32_t) cand.size()) {
        std::nth_element(cand.begin(), cand.begin() + n_free, cand.end(), by_rank);
    }
    std::sort(cand.begin(), cand.begin() + n_free, by_rank);
    std::vector<uint32_t> victims;
    for (int32_t i = 0; i < n_free; ++i) {
        victims.push_back(cand[i].cell);
    }
    return victims;
}

// The one set of n_free cells freed for every unit (llama.cpp's one KQ mask). With one group,
// its victims. Otherwise the candidate cells (the same for every group) most groups want to
// drop, ties to the lower cell: each group then moves as few kept tokens as the vote allows
std::vector<uint32_t> common_freed(const std::vector<std::vector<uint32_t>> & victims,
                                   const std::vector<kv_cell_rank> & candidates, int32_t n_free, uint32_t kv_size) {
    if (victims.size() == 1) {
        return victims[0];
    }
    std::vector<int32_t> votes(kv_size, 0);
    for (const auto & group_victims : victims) {
        for (uint32_t cell : group_victims) {
            votes[cell]++;
        }
    }
    std::vector<kv_cell_rank> by_votes = candidates;
    std::stable_sort(by_votes.begin(), by_votes.end(), [&](const kv_cell_rank & a, const kv_cell_rank & b) {
        return votes[a.cell] > votes[b.cell] || (votes[a.cell] == votes[b.cell] && a.cell < b.cell);
    });
    std::vector<uint32_t> freed;
    for (int32_t i = 0; i < n_free; ++i) {
        freed.push_back(by_votes[i].cell);
    }
    return freed;
}

// Each group keeps its tokens in the freed cells by moving them into its own victims'
// cells outside the freed set: as many of those as kept tokens inside it, paired in cell order
unit_moves plan_moves(const std::vector<unit_group> & groups, const std::vector<std::vector<uint32_t>> & victims,
                      const std::vector<uint32_t> & freed, uint32_t n_units, uint32_t kv_size) {
    std::vector<uint8_t> is_freed(kv_size, 0);
    for (uint32_t cell : freed) {
        is_freed[cell] = 1;
    }
    unit_moves moves(n_units);
    for (size_t g = 0; g < groups.size(); ++g) {
        std::vector<uint8_t> is_victim(kv_size, 0);
        std::vector<uint32_t> holes; // victims outside the freed set: where kept tokens go
        for (uint32_t cell : victims[g]) {
            is_victim[cell] = 1;
            if (!is_freed[cell]) {
                holes.push_back(cell);
            }
        }
        std::vector<uint32_t> kept; // freed cells whose token the group keeps
        for (uint32_t cell : freed) {
            if (!is_victim[cell]) {
                kept.push_back(cell);
            }
        }
        GGML_ASSERT(kept.size() == holes.size());
        std::sort(holes.begin(), holes.end());
        std::sort(kept.begin(), kept.end());
        for (uint32_t unit : groups[g]) {
            for (size_t i = 0; i < kept.size(); ++i) {
                moves[unit].push_back({ kept[i], holes[i] });
            }
        }
    }
    return moves;
}

bool any_move(const unit_moves & moves) {
    return std::any_of(moves.begin(), moves.end(), [](const auto & m) { return !m.empty(); });
}

// After the rows moved: the unit map follows its tokens, and a cell's llama.cpp position
// follows the token its first unit (layer 0, head 0) holds, so kv_scores()'s positions, the
// token index and compaction agree on what a cell holds (every kept token is older than any
// query: the mask is unchanged)
void follow_moves(llama_kv_units & map, llama_kv_cells & cells, uint32_t strm, llama_seq_id seq_id,
                  const unit_moves & moves) {
    for (uint32_t unit = 0; unit < moves.size(); ++unit) {
        for (const auto & [src, dst] : moves[unit]) {
            map.pos[map.at(strm, unit, dst)]  = map.pos[map.at(strm, unit, src)];
            map.born[map.at(strm, unit, dst)] = map.born[map.at(strm, unit, src)];
        }
    }
    map.diverged[strm] = 1;
    for (const auto & [src, dst] : moves[0]) {
        const llama_pos pos = map.pos[map.at(strm, 0, dst)];
        if (cells.pos_get(dst) != pos) {
            cells.rm(dst);
            cells.pos_set(dst, pos);
            cells.seq_add(dst, seq_id);
        }
    }
}

// drop seq_id from the freed cells; the stream's head (where find_slot starts) moves down to
// the lowest cell emptied
void free_cells(llama_kv_cells & cells, uint32_t & head, llama_seq_id seq_id, const std::vector<uint32_t> & freed) {
    for (uint32_t cell : freed) {
        if (cells.seq_rm(cell, seq_id) && cell < head) {
            head = cell;
        }
    }
}

} // namespace

// Free up to n_free cells of seq_id in stream strm: group the units, take each group's
// candidates, rank them (the policy's scorer), pick each group's victims, agree on one set
// of cells to free, move each group's kept tokens out of it, free it. Returns the number freed.
int32_t llama_kv_score_access::evict_seq_impl(llama_context & lctx, llama_kv_cache & kv, const llama_kv_policy_cfg & cfg,
                                              llama_kv_score_state & st, uint32_t strm, int32_t seq_id, int32_t n_free) {
    auto & cells = kv.v_cells[strm];
    const auto seq = seq_cells(cells, seq_id);
    const uint32_t kv_size = (uint32_t) cells.size();

    const auto gran = cfg.scored() ? cfg.granularity() : LLAMA_KV_GRANULARITY_TOKEN;
    llama_kv_units & map = units(kv, cfg.tracks_units());
    const bool per_group = map.allocated() && gran != LLAMA_KV_GRANULARITY_TOKEN;

    const uint32_t n_head  = std::max<int32_t>(1, n_head_kv(kv));
    const uint32_t n_units = (uint32_t) n_scored_layers(kv)*n_head;
    const auto groups = unit_groups(gran, per_group, map.n_layer, n_head, n_units);

    const int32_t n_recent = cfg.n_recent_for((int32_t) seq.size(), n_free);
    auto candidates = group_candidates(seq, groups, per_group ? &map : nullptr, strm,
                                       shared_cells(cells, seq, groups.size()), cfg.params.n_sink, n_recent);
    for (const auto & group : candidates) {
        n_free = std::min<int32_t>(n_free, (int32_t) group.size());
    }
    if (n_free <= 0) {
        return 0;
    }

    const auto scorer = llama_kv_make_scorer(cfg, st.rng);
    const auto inputs = scorer_inputs(kv, map, strm, seq_id, n_head, kv_size, scorer->reads_scores());
    std::vector<std::vector<uint32_t>> victims;
    for (size_t g = 0; g < groups.size(); ++g) {
        scorer->rank(inputs, groups[g], candidates[g]);
        victims.push_back(lowest_ranked(candidates[g], n_free));
    }

    const auto freed = common_freed(victims, candidates[0], n_free, kv_size);
    if (groups.size() > 1) {
        const auto moves = plan_moves(groups, victims, freed, n_units, kv_size);
        if (any_move(moves)) {
            if (!move_unit_rows(lctx, kv, strm, moves)) {
                LLAMA_LOG_ERROR("%s: moving the kept tokens of a layer/head failed; nothing evicted\n", __func__);
                return 0;
            }
            follow_moves(map, cells, strm, seq_id, moves);
        }
    }

    free_cells(cells, kv.v_heads[strm], seq_id, freed);
    return n_free;
}

// one eviction event: its cells and the time since t0_us
static void record_eviction(llama_kv_score_state & st, int32_t n_freed, int64_t t0_us) {
    if (n_freed > 0) {
        st.n_evictions++;
        st.n_cells_evicted += n_freed;
    }
    st.t_evict_us += ggml_time_us() - t0_us;
}

int32_t llama_kv_score_access::evict_seq(llama_context & lctx, int32_t seq_id, int32_t n_free) {
    llama_kv_cache * kv = get_kv(lctx);
    if (kv == nullptr) {
        return LLAMA_KV_POLICY_ERR_MEMORY;
    }
    if (!valid_seq(*kv, seq_id)) {
        return LLAMA_KV_POLICY_ERR_SEQ;
    }
    if (n_free < 0) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    const auto & c = lctx.cparams.kv_policy;
    if (c.kind() == LLAMA_KV_POLICY_NONE) {
        return 0;
    }

    lctx.synchronize();
    flush_lazy(lctx, *kv);

    const int64_t t0 = ggml_time_us();

    auto & st = lctx.kv_score;
    const int32_t n = evict_seq_impl(lctx, *kv, c, st, stream_of(kv->seq_to_stream, seq_id), seq_id, n_free);
    record_eviction(st, n, t0);

    return n;
}

namespace {

// A cell of an SWA cache that find_slot may overwrite: empty, or held by one sequence
// and outside that sequence's window (llama_kv_cache::find_slot's own test)
bool swa_reusable(const llama_kv_cells & cells, uint32_t n_swa, llama_swa_type swa_type, uint32_t c) {
    if (cells.is_empty(c)) {
        return true;
    }
    if (cells.seq_count(c) != 1) {
        return false;
    }
    return llama_hparams::is_masked_swa(n_swa, swa_type, cells.pos_get(c), cells.seq_pos_max(cells.seq_get(c)) + 1);
}

// the positions of seq_id's cells in an SWA cache that are still inside its window
// and held by it alone, oldest first: what the SWA cache can give up
std::vector<llama_pos> swa_window(const llama_kv_cells & cells, uint32_t n_swa, llama_swa_type swa_type, llama_seq_id seq_id) {
    std::vector<llama_pos> res;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if (!cells.is_empty(c) && cells.seq_has(c, seq_id) && !swa_reusable(cells, n_swa, swa_type, c) &&
            cells.seq_count(c) == 1) {
            res.push_back(cells.pos_get(c));
        }
    }
    std::sort(res.begin(), res.end());
    return res;
}

// What a batch asks of one cache, per stream: the cells its tokens need beyond the
// ones the cache can give them now, with a chunk of headroom per sequence (what an
// eviction frees, so that the next batches fit too) and without it (short of that
// the batch cannot fit at all)
struct stream_need {
    std::vector<int64_t> with_chunk;
    std::vector<int64_t> bare;
};

// v_cells, seq_to_stream: the cache's (llama_kv_cache keeps them private: its friend
// passes them); n_add: the tokens the batch adds per sequence; n_usable(cells): how
// many cells of a stream the batch's tokens can take without an eviction
template <typename NUsable>
stream_need need_per_stream(const llama_kv_cells_vec & v_cells, const std::vector<uint32_t> & seq_to_stream,
                            const std::map<llama_seq_id, int32_t> & n_add, int32_t chunk, NUsable n_usable) {
    const size_t n_stream = v_cells.size();
    stream_need need{ std::vector<int64_t>(n_stream, 0), std::vector<int64_t>(n_stream, 0) };
    for (const auto & [sid, n] : n_add) {
        const uint32_t strm = stream_of(seq_to_stream, sid);
        need.with_chunk[strm] += n + chunk;
        need.bare[strm]       += n;
    }
    for (size_t s = 0; s < n_stream; ++s) {
        const int64_t usable = n_usable(v_cells[s]);
        need.with_chunk[s] -= usable;
        need.bare[s]       -= usable;
    }
    return need;
}

} // namespace

int32_t llama_kv_score_access::evict_for_batch(llama_context & lctx, const llama_batch_allocr & balloc) {
    const auto & c = lctx.cparams.kv_policy;
    if (c.kind() == LLAMA_KV_POLICY_NONE) {
        return 0;
    }
    llama_kv_cache * kv = get_kv(lctx);
    if (kv == nullptr || kv->other != nullptr) {
        return 0;
    }
    flush_lazy(lctx, *kv);

    const int64_t t0 = ggml_time_us();

    // tokens the batch adds to each sequence
    const llama_batch & batch = balloc.get_batch();
    std::map<llama_seq_id, int32_t> n_add;
    for (int32_t i = 0; i < batch.n_tokens; ++i) {
        const int32_t n_seq = batch.n_seq_id ? batch.n_seq_id[i] : 1;
        for (int32_t j = 0; j < n_seq; ++j) {
            const llama_seq_id sid = batch.seq_id ? batch.seq_id[i][j] : 0;
            if (valid_seq(*kv, sid)) {
                n_add[sid]++;
            }
        }
    }

    // per stream: how many cells are missing beyond the free ones (with a chunk of
    // headroom per sequence, and without), and how many the batch's sequences could give up
    const uint32_t n_stream = kv->v_cells.size();
    auto [deficit, short_by] = need_per_stream(kv->v_cells, kv->seq_to_stream, n_add, c.params.evict_chunk,
                                               [](const llama_kv_cells & cells) {
        return (int64_t) cells.size() - cells.get_used();
    });
    std::vector<int64_t> avail(n_stream, 0);
    for (const auto & [sid, n] : n_add) {
        avail[stream_of(kv->seq_to_stream, sid)] += std::max(0, n_cells(*kv, sid) - c.params.n_sink - std::max(0, c.params.n_recent));
    }
    for (uint32_t s = 0; s < n_stream; ++s) {
        if (short_by[s] > avail[s]) {
            // cannot fit even after evicting everything evictable: leave the cache as it is
            lctx.kv_score.t_evict_us += ggml_time_us() - t0;
            return -1;
        }
    }

    // iSWA memory: the SWA cache fails a batch too when its cells (fewer than its window
    // when n_ctx is small) are all inside the window. It gives up its oldest tokens, as
    // a shorter window would: per stream, the reusable cells (empty or out of the window)
    // must cover the batch plus the chunk. Checked before either cache is touched.
    llama_kv_cache * swa = get_swa(lctx);
    std::map<llama_seq_id, int64_t> swa_drop; // per sequence: oldest window cells to free
    if (swa != nullptr) {
        const uint32_t n_stream_swa = swa->v_cells.size();
        auto [need, need_min] = need_per_stream(swa->v_cells, swa->seq_to_stream, n_add, c.params.evict_chunk,
                                                [swa](const llama_kv_cells & cells) {
            int64_t n_reusable = 0;
            for (uint32_t i = 0; i < cells.size(); ++i) {
                n_reusable += swa_reusable(cells, swa->n_swa, swa->swa_type, i);
            }
            return n_reusable;
        });
        for (const auto & [sid, n] : n_add) {
            const uint32_t strm = stream_of(swa->seq_to_stream, sid);
            if (need[strm] <= 0) {
                continue;
            }
            const int64_t have = (int64_t) swa_window(swa->v_cells[strm], swa->n_swa, swa->swa_type, sid).size();
            const int64_t take = std::min<int64_t>({ need[strm], n + c.params.evict_chunk, have });
            swa_drop[sid] = take;
            need[strm]     -= take;
            need_min[strm] -= take;
        }
        for (uint32_t s = 0; s < n_stream_swa; ++s) {
            if (need_min[s] > 0) {
                lctx.kv_score.t_evict_us += ggml_time_us() - t0;
                return -1;
            }
        }
    }

    lctx.synchronize();

    auto & st = lctx.kv_score;
    int32_t n_freed = 0;     // base cells (the engine's counters)
    int32_t n_freed_swa = 0; // SWA cells

    for (const auto & [sid, take] : swa_drop) {
        if (take <= 0) {
            continue;
        }
        const auto win = swa_window(swa->v_cells[stream_of(swa->seq_to_stream, sid)], swa->n_swa, swa->swa_type, sid);
        // the oldest `take` tokens of the window (and the out-of-window ones below them)
        swa->seq_rm(sid, -1, win[take - 1] + 1);
        n_freed_swa += (int32_t) take;
    }

    // Only the streams that cannot take their tokens evict (when any cannot): with
    // per-sequence streams (llama-server's parallel slots, kv_unified=false) a slot then
    // evicts exactly when and what it would alone, whichever other slots share the batch.
    bool any_short = false;
    for (uint32_t s = 0; s < n_stream; ++s) {
        any_short = any_short || short_by[s] > 0;
    }

    // each sequence gives up at most what it adds plus the chunk, until its stream fits
    for (const auto & [sid, n] : n_add) {
        const uint32_t strm = stream_of(kv->seq_to_stream, sid);
        const int64_t want = std::min<int64_t>(deficit[strm], n + c.params.evict_chunk);
        if (want <= 0 || (any_short && short_by[strm] <= 0)) {
            continue;
        }
        const int32_t got = evict_seq_impl(lctx, *kv, c, st, strm, sid, (int32_t) want);
        deficit[strm] -= got;
        n_freed += got;
    }

    record_eviction(st, n_freed, t0);

    return n_freed + n_freed_swa;
}
