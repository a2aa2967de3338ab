// a2sf: eviction of the lowest-ranked cells when a batch finds no free KV slot.
//
// Cells hold one token for all layers and heads, so a cell's rank is its score
// summed over the scored layers (or its position for StreamingLLM, or a random
// number for the random baseline). The n_sink lowest and the n_recent highest
// positions of a sequence are never evicted. Evicting a cell only frees it: K/V
// stay where they are and no position is shifted.

#include "llama-kv-score.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-policy.h"

#include "ggml-backend.h"

#include <algorithm>
#include <map>
#include <vector>

namespace {

struct kv_cell_rank {
    uint32_t  cell;
    llama_pos pos;
    float     rank; // evicted lowest first
};

} // namespace

llama_kv_cache * llama_kv_score_access::get_kv(const llama_context & lctx) {
    return dynamic_cast<llama_kv_cache *>(lctx.memory.get());
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

// the cells of seq_id, ordered by position
static std::vector<kv_cell_rank> seq_cells(const llama_kv_cells & cells, llama_seq_id seq_id) {
    std::vector<kv_cell_rank> res;
    for (uint32_t c = 0; c < cells.size(); ++c) {
        if (!cells.is_empty(c) && cells.seq_has(c, seq_id)) {
            res.push_back({ c, cells.pos_get(c), 0.0f });
        }
    }
    std::sort(res.begin(), res.end(), [](const kv_cell_rank & a, const kv_cell_rank & b) { return a.pos < b.pos; });
    return res;
}

// one stream's scores of every scored layer, copied from wherever the layer lives
static std::vector<float> read_layer_scores(ggml_tensor * score, uint32_t strm) {
    const int64_t kv_size = score->ne[0];
    std::vector<float> res(kv_size);
    ggml_backend_tensor_get(score, res.data(), strm*score->nb[1], kv_size*sizeof(float));
    return res;
}

int32_t llama_kv_score_access::read_scores(llama_context & lctx, int32_t seq_id, int32_t capacity,
                                           int32_t * pos_out, int32_t * cell_out, float * scores_out) {
    llama_kv_cache * kv = get_kv(lctx);
    if (kv == nullptr) {
        return LLAMA_KV_POLICY_ERR_MEMORY;
    }
    if (!valid_seq(*kv, seq_id)) {
        return LLAMA_KV_POLICY_ERR_SEQ;
    }

    lctx.synchronize();

    const uint32_t strm = stream_of(kv->seq_to_stream, seq_id);
    const auto sc = seq_cells(kv->v_cells[strm], seq_id);
    const int32_t n = (int32_t) sc.size();
    if (n > capacity) {
        return LLAMA_KV_POLICY_ERR_CAPACITY;
    }

    for (int32_t i = 0; i < n; ++i) {
        if (pos_out)  { pos_out[i]  = sc[i].pos;  }
        if (cell_out) { cell_out[i] = sc[i].cell; }
    }

    if (scores_out) {
        const auto layers = scored_layers(*kv);
        for (size_t il = 0; il < layers.size(); ++il) {
            const auto s = read_layer_scores(layers[il], strm);
            for (int32_t i = 0; i < n; ++i) {
                scores_out[il*n + i] = s[sc[i].cell];
            }
        }
    }

    return n;
}

// Free up to n_free cells of seq_id by the policy's ranking. Returns the number freed.
static int32_t evict_seq_impl(llama_kv_cells_vec & v_cells, std::vector<uint32_t> & v_heads,
                              const std::vector<ggml_tensor *> & scores, const llama_kv_policy_cfg & cfg,
                              llama_kv_score_state & st, uint32_t strm, llama_seq_id seq_id, int32_t n_free) {
    auto & cells = v_cells[strm];

    auto sc = seq_cells(cells, seq_id);
    const int32_t n_cells = (int32_t) sc.size();
    const int32_t n_sink  = std::min(n_cells, cfg.params.n_sink);
    const int32_t n_keep  = n_sink + std::min(n_cells - n_sink, cfg.params.n_recent);
    const int32_t n_cand  = n_cells - n_keep;

    n_free = std::min(n_free, n_cand);
    if (n_free <= 0) {
        return 0;
    }

    // the candidates: everything between the sinks and the recent window
    std::vector<kv_cell_rank> cand(sc.begin() + n_sink, sc.begin() + n_sink + n_cand);

    switch (cfg.kind()) {
        case LLAMA_KV_POLICY_SCORE:
            {
                std::vector<float> total(cells.size(), 0.0f);
                for (ggml_tensor * score : scores) {
                    const auto s = read_layer_scores(score, strm);
                    for (auto & c : cand) {
                        total[c.cell] += s[c.cell];
                    }
                }
                for (auto & c : cand) {
                    c.rank = total[c.cell];
                }
            } break;
        case LLAMA_KV_POLICY_RANDOM:
            {
                std::uniform_real_distribution<float> u(0.0f, 1.0f);
                for (auto & c : cand) {
                    c.rank = u(st.rng);
                }
            } break;
        case LLAMA_KV_POLICY_NONE: // never reached: callers return early
        case LLAMA_KV_POLICY_STREAMING: // the oldest go first
            {
                for (auto & c : cand) {
                    c.rank = (float) c.pos;
                }
            } break;
    }

    // lowest rank first; ties go to the older token
    std::stable_sort(cand.begin(), cand.end(), [](const kv_cell_rank & a, const kv_cell_rank & b) {
        return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
    });

    uint32_t & head = v_heads[strm];
    for (int32_t i = 0; i < n_free; ++i) {
        const uint32_t c = cand[i].cell;
        if (cells.seq_rm(c, seq_id) && c < head) {
            head = c;
        }
    }

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

    const int64_t t0 = ggml_time_us();

    const std::vector<ggml_tensor *> scores = scored_layers(*kv);

    auto & st = lctx.kv_score;
    const int32_t n = evict_seq_impl(kv->v_cells, kv->v_heads, scores, c, st,
                                     stream_of(kv->seq_to_stream, seq_id), seq_id, n_free);
    record_eviction(st, n, t0);

    return n;
}

int32_t llama_kv_score_access::evict_for_batch(llama_context & lctx, const llama_batch_allocr & balloc) {
    const auto & c = lctx.cparams.kv_policy;
    if (c.kind() == LLAMA_KV_POLICY_NONE) {
        return 0;
    }
    llama_kv_cache * kv = get_kv(lctx);
    if (kv == nullptr || kv->other != nullptr) {
        return 0;
    }

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

    // per stream: how many cells are missing (with a chunk of headroom per sequence),
    // and how many the batch's sequences could give up
    const uint32_t n_stream = kv->v_cells.size();
    std::vector<int64_t> deficit(n_stream, 0);
    std::vector<int64_t> short_by(n_stream, 0);
    std::vector<int64_t> avail(n_stream, 0);

    for (const auto & [sid, n] : n_add) {
        const uint32_t strm = stream_of(kv->seq_to_stream, sid);
        deficit[strm]  += n + c.params.evict_chunk;
        short_by[strm] += n;
        avail[strm]    += std::max(0, n_cells(*kv, sid) - c.params.n_sink - c.params.n_recent);
    }
    for (uint32_t s = 0; s < n_stream; ++s) {
        const auto & cells = kv->v_cells[s];
        const int64_t n_free_now = (int64_t) cells.size() - cells.get_used();
        deficit[s]  -= n_free_now;
        short_by[s] -= n_free_now;
        if (short_by[s] > avail[s]) {
            // cannot fit even after evicting everything evictable: leave the cache as it is
            lctx.kv_score.t_evict_us += ggml_time_us() - t0;
            return -1;
        }
    }

    lctx.synchronize();

    const std::vector<ggml_tensor *> scores = scored_layers(*kv);

    auto & st = lctx.kv_score;
    int32_t n_freed = 0;

    // each sequence gives up at most what it adds plus the chunk, until its stream fits
    for (const auto & [sid, n] : n_add) {
        const uint32_t strm = stream_of(kv->seq_to_stream, sid);
        const int64_t want = std::min<int64_t>(deficit[strm], n + c.params.evict_chunk);
        if (want <= 0) {
            continue;
        }
        const int32_t got = evict_seq_impl(kv->v_cells, kv->v_heads, scores, c, st, strm, sid, (int32_t) want);
        deficit[strm] -= got;
        n_freed += got;
    }

    record_eviction(st, n_freed, t0);

    return n_freed;
}
