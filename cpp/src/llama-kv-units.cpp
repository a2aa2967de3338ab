// a2sf: the map of what each (scored layer, KV head) holds in each cell (llama_kv_units).
//
// Allocated when a policy first needs it (granularity LAYER / HEAD, mean attention),
// from the cells' own positions: until tokens move, every unit of a cell holds the
// cell's token. Every write of a ubatch is recorded (set_score_inputs), eviction moves
// entries with the rows it moves (llama-kv-evict.cpp), state save/load carries it.

#include "llama-kv-score.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-kv-policy.h"

#include "ggml-backend.h"

#include <algorithm>

int32_t llama_kv_score_access::n_head_kv(const llama_kv_cache & kv) {
    int32_t n = 0;
    for (const auto & layer : kv.layers) {
        if (layer.score) {
            n = std::max<int32_t>(n, (int32_t) layer.score->ne[1]);
        }
    }
    return n;
}

void llama_kv_score_access::reset_units(const llama_kv_cache & kv) {
    kv.a2sf_units = llama_kv_units();
}

llama_kv_units & llama_kv_score_access::units(const llama_kv_cache & kv, bool allocate) {
    llama_kv_units & u = kv.a2sf_units;
    if (u.allocated() || !allocate) {
        return u;
    }
    u.n_layer   = (uint32_t) n_scored_layers(kv);
    u.n_head_kv = (uint32_t) n_head_kv(kv);
    u.n_stream  = (uint32_t) kv.v_cells.size();
    u.kv_size   = u.n_stream ? (uint32_t) kv.v_cells[0].size() : 0;
    if (u.n_units() == 0 || u.kv_size == 0) {
        u = llama_kv_units();
        return u;
    }
    const size_t n = (size_t) u.n_stream*u.n_units()*u.kv_size;
    u.pos.assign(n, -1);
    u.born.assign(n, 0);
    u.diverged.assign(u.n_stream, 0);
    u.n_queries.clear();
    // cells written before the map existed: their own position; a single sequence's
    // token at position p has been seen by the queries p..n_past-1, so it was born at p
    for (uint32_t s = 0; s < u.n_stream; ++s) {
        const auto & cells = kv.v_cells[s];
        for (uint32_t c = 0; c < cells.size(); ++c) {
            if (cells.is_empty(c)) {
                continue;
            }
            const llama_pos p = cells.pos_get(c);
            for (uint32_t k = 0; k < u.n_units(); ++k) {
                u.pos[u.at(s, k, c)]  = p;
                u.born[u.at(s, k, c)] = p;
            }
            for (int32_t sid = 0; sid < LLAMA_MAX_SEQ; ++sid) {
                if (cells.seq_has(c, sid)) {
                    auto & nq = u.n_queries[sid];
                    nq = std::max<int64_t>(nq, (int64_t) p + 1);
                }
            }
        }
    }
    return u;
}

void llama_kv_score_access::record_writes(const llama_kv_cache & kv, uint32_t s0,
                                          const std::vector<std::vector<uint32_t>> & idxs, const llama_ubatch & ub) {
    llama_kv_units & u = units(kv, true);
    if (!u.allocated()) {
        return;
    }
    const uint32_t n_stream = (uint32_t) idxs.size();
    const uint32_t n_tps    = n_stream ? ub.n_tokens/n_stream : 0;

    std::map<int32_t, int64_t> n_new; // tokens of each sequence in this ubatch, counted in order
    for (uint32_t s = 0; s < n_stream; ++s) {
        const uint32_t strm = s0 + s;
        for (uint32_t t = 0; t < n_tps && t < idxs[s].size(); ++t) {
            const uint32_t i   = s*n_tps + t;
            const int32_t  sid = ub.seq_id[i][0];
            const uint32_t c   = idxs[s][t];
            const int64_t born = u.n_queries[sid] + n_new[sid]++;
            for (uint32_t k = 0; k < u.n_units(); ++k) {
                u.pos[u.at(strm, k, c)]  = ub.pos[i];
                u.born[u.at(strm, k, c)] = born;
            }
        }
    }
    for (const auto & [sid, n] : n_new) {
        u.n_queries[sid] += n;
    }
}

void llama_kv_score_access::copy_stream_units(const llama_kv_cache & kv, uint32_t ssrc, uint32_t sdst) {
    llama_kv_units & u = kv.a2sf_units;
    if (!u.allocated() || ssrc >= u.n_stream || sdst >= u.n_stream) {
        return;
    }
    const size_t n = (size_t) u.n_units()*u.kv_size;
    std::copy_n(u.pos.begin()  + u.at(ssrc, 0, 0), n, u.pos.begin()  + u.at(sdst, 0, 0));
    std::copy_n(u.born.begin() + u.at(ssrc, 0, 0), n, u.born.begin() + u.at(sdst, 0, 0));
    u.diverged[sdst] = u.diverged[ssrc];
}

int32_t llama_kv_score_access::head_scores(llama_context & lctx, int32_t seq_id, int32_t capacity,
                                           int32_t * pos_out, float * scores_out) {
    llama_kv_cache * kv = nullptr;
    uint32_t strm = 0;
    std::vector<std::pair<int32_t, uint32_t>> order; // the sequence's cells, as llama_kv_policy_scores orders them
    if (const int32_t rc = cells_for_read(lctx, seq_id, capacity, kv, strm, order)) {
        return rc;
    }
    const int32_t n = (int32_t) order.size();

    const auto layers = scored_layers(*kv);
    const int32_t n_hkv = n_head_kv(*kv);
    const llama_kv_units & u = kv->a2sf_units;

    for (size_t il = 0; il < layers.size(); ++il) {
        ggml_tensor * score = layers[il]; // F32 [kv_size, n_head_kv, n_stream]
        const int64_t kv_size = score->ne[0];
        const int64_t nh      = score->ne[1];
        std::vector<float> s;
        if (scores_out) {
            s.resize(kv_size*nh);
            ggml_backend_tensor_get(score, s.data(), strm*score->nb[2], s.size()*sizeof(float));
        }
        for (int32_t h = 0; h < n_hkv; ++h) {
            for (int32_t i = 0; i < n; ++i) {
                const uint32_t c   = order[i].second;
                const size_t   off = ((size_t) il*n_hkv + h)*n + i;
                if (pos_out) {
                    pos_out[off] = h >= nh ? -1 :
                        u.allocated() ? u.pos[u.at(strm, (uint32_t) (il*u.n_head_kv + h), c)] : order[i].first;
                }
                if (scores_out) {
                    scores_out[off] = h < nh ? s[h*kv_size + c] : 0.0f;
                }
            }
        }
    }
    return n;
}
