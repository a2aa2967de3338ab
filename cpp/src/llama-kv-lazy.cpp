// a2sf: lazy scoring -- the attention of queries that flash attention never
// materialised, scored in one batched product per stream instead of once per ubatch
// (see llama_kv_lazy in llama-kv-score.h).
//
// Why it is exact. Between two flushes a stream only gains cells: every event that
// removes, moves or renumbers cells (eviction, compaction, llama_memory_seq_*, state
// load) flushes first. A ring holds the queries of one sequence, each with its
// position p_t. The cells that query t attended are then exactly the cells present
// now that hold the sequence at a position <= p_t (llama.cpp's causal mask, plus the
// sliding window of an all-SWA cache), and their K rows are unchanged, so its softmax
// row is recomputed bit for bit the same way the eager path does it. The eager update
// over queries t = 0..n-1 composes to
//
//     S <- alpha^n * S + sum_t alpha^(n-1-t) * P[t]          (cells the sequence holds)
//
// with S taken as 0 for the cells written since the last flush (their old score was
// an evicted token's) and untouched for the cells of other sequences: one product
// K.Q^T over the ring, its masked softmax, and the same update ops as a prefill ubatch.
// For alpha < 1 the sum runs over the last rows_that_count(n) queries only, the same
// bound (and tolerance) eager prefill uses within a ubatch; a window ring keeps
// exactly those, so a prompt of many ubatches costs one product over its last rows.
//
// Only flash-attention graphs are lazy: without flash attention llama.cpp already
// materialises the probabilities and the eager update costs little.

#include "llama-kv-score.h"
#include "llama-kv-side-graph.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cmath>
#include <limits>

namespace {

// the query tokens of a lazy ubatch that go into the rings: all of a decode ubatch
// (one per stream), the last n_slots of a prefill ubatch (one stream; a window ring
// keeps no more, and earlier ones weigh nothing at the next flush)
int64_t n_stored(const llama_kv_lazy & lz, uint32_t n_tokens, uint32_t n_stream) {
    if (n_tokens == n_stream) {
        return n_tokens;
    }
    return n_tokens < lz.n_slots ? n_tokens : lz.n_slots;
}

// the ring row of every (query head, stored token) of a lazy ubatch: filled by set_lazy_inputs
class llm_graph_input_kv_lazy : public llm_graph_input_i {
public:
    llm_graph_input_kv_lazy(const llama_kv_cache_context * mctx, const llama_kv_policy_cfg & cfg) : mctx(mctx), cfg(cfg) {}

    void set_input(const llama_ubatch * ubatch) override {
        llama_kv_score_access::set_lazy_inputs(mctx, ubatch, cfg, rows);
    }

    bool can_reuse(const llm_graph_params & params) override {
        mctx = llama_kv_score_access::base_context(params.mctx);
        return llama_kv_score_access::lazy_graph_reusable(mctx, params.ubatch.n_tokens, rows->ne[0]/n_head, n_slots);
    }

    int64_t n_head  = 0;
    int64_t n_slots = 0;
    ggml_tensor * rows = nullptr; // I64 [n_head*n_stored]: row h + n_head*t of the stored Q goes to this ring row

    const llama_kv_cache_context * mctx;
    const llama_kv_policy_cfg cfg;
};

} // namespace

// the rings' shape for this policy and cache: a window of the queries that count when
// alpha < 1 and the window costs at most twice the memory of the scored layers' K and V
// (so a small cache does not carry a large ring), else a buffer of N_SLOTS_BUFFER
void llama_kv_score_access::lazy_ring_shape(const llama_kv_policy_cfg & cfg, const llama_kv_cache & kv, const std::vector<int32_t> & ids,
                uint32_t & n_slots, bool & window) {
    n_slots = llama_kv_lazy::N_SLOTS_BUFFER;
    window  = false;
    const int64_t k = cfg.rows_that_count(std::numeric_limits<int32_t>::max());
    if (k > (int64_t) llama_kv_lazy::N_SLOTS_WINDOW) {
        return;
    }
    const uint32_t slots = std::max<uint32_t>((uint32_t) k, llama_kv_lazy::N_SLOTS_BUFFER);
    size_t ring_bytes = 0;
    size_t kv_bytes   = 0;
    for (int32_t il : ids) {
        const auto & layer = kv.layers[kv.map_layer_ids.at(il)];
        ring_bytes += (size_t) slots*kv.hparams.n_embd_head_k(il)*kv.hparams.n_head(il)*sizeof(float)*kv.v_cells.size();
        kv_bytes   += ggml_nbytes(layer.k) + ggml_nbytes(layer.v);
    }
    if (ring_bytes <= 2*kv_bytes) {
        n_slots = slots;
        window  = true;
    }
}

bool llama_kv_score_access::lazy_graph_reusable(const llama_kv_cache_context * mctx, uint32_t n_tokens,
                                                int64_t n_store, int64_t n_slots) {
    const auto & lz = mctx->kv->a2sf_units.lazy;
    return lz.step_lazy && (int64_t) lz.n_slots == n_slots &&
           n_store == n_stored(lz, n_tokens, mctx->sinfos[mctx->i_cur].n_stream());
}

bool llama_kv_score_access::lazy_step(const llama_kv_cache_context * mctx) {
    return mctx->kv->a2sf_units.lazy.step_lazy;
}

void llama_kv_score_access::before_ubatch(llama_context & lctx, const llama_ubatch & ubatch, const llama_memory_context_i * mctx) {
    const auto & cfg = lctx.cparams.kv_policy;
    llama_kv_cache * kv = get_kv(lctx);
    if (kv == nullptr || mctx == nullptr) {
        return;
    }
    auto & lz = kv->a2sf_units.lazy;
    lz.owner     = &lctx;
    lz.step_lazy = false;

    // A unit map outlives the policy that built it (a switch to granularity token or to
    // streaming keeps K/V rows that per-head moves left in other cells): record this
    // ubatch's writes here when the policy's own graph inputs will not, so that the map
    // stays the truth about every cell (kv_head_scores, compaction, state)
    const llama_kv_cache_context * kctx = base_context(mctx);
    if (kctx != nullptr && kv->a2sf_units.allocated() && !cfg.tracks_units()) {
        const auto & sinfo = kctx->sinfos[kctx->i_cur];
        record_writes(*kv, sinfo.s0, sinfo.idxs, ubatch);
    }

    if (!cfg.scored()) {
        return;
    }

    const llama_hparams & hp = kv->hparams;
    const auto ids = scored_layer_ids(*kv);

    // lazy: flash attention (otherwise the probabilities are free), causal attention with
    // plain positions (the flush rebuilds the causal mask), no ALiBi (its bias is per query
    // head), the same query heads in every scored layer
    bool lazy = cfg.lazy_decode() && !lz.no_memory && lctx.cparams.flash_attn && lctx.cparams.causal_attn &&
                !uses_alibi(lctx) && !ubatch.is_pos_2d() && !ids.empty();
    for (int32_t il : ids) {
        lazy = lazy && hp.n_head(il) == hp.n_head(ids[0]) && hp.n_embd_head_k(il) == hp.n_embd_head_k(ids[0]);
    }

    // the rings' shape follows the policy and the cache (a policy change flushes first)
    uint32_t n_slots = 0;
    bool window = false;
    lazy_ring_shape(cfg, *kv, ids, n_slots, window);
    if (n_slots != lz.n_slots || window != lz.window) {
        if (lz.pending()) {
            flush_lazy(lctx, *kv);
        }
        lz.rings.clear();
        lz.ctxs.clear();
        lz.bufs.clear();
        lz.n_slots = n_slots;
        lz.window  = window;
    }

    // a decode ubatch has one token per stream; a prefill ubatch goes to a window ring
    // when it holds one sequence in one stream
    const auto & sinfo = kctx->sinfos[kctx->i_cur];
    bool one_seq_each = true;
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        one_seq_each = one_seq_each && ubatch.n_seq_id[i] == 1;
    }
    const bool decode  = ubatch.n_tokens == sinfo.n_stream();
    const bool prefill = !decode && lz.window && sinfo.n_stream() == 1 && ubatch.n_seqs_unq == 1;
    // auto: a host cache scores its decode steps in their own graph (with the unfused
    // attention where the CPU runs it faster: attn_unfused); its prefill ubatches still go
    // to a window ring
    const bool decode_lazy = decode && !eager_host_decode(cfg, *kv);
    lazy = lazy && one_seq_each && (decode_lazy || prefill);

    if (lz.pos.size() != kv->v_cells.size()) {
        GGML_ASSERT(!lz.pending());
        lz.seq.assign(kv->v_cells.size(), -1);
        lz.pos.assign(kv->v_cells.size(), {});
        lz.written.assign(kv->v_cells.size(), {});
    }

    // a ring holds one sequence's queries; a buffer ring at most n_slots
    bool must_flush = !lazy;
    const uint32_t n_tps = ubatch.n_tokens/sinfo.n_stream(); // tokens per stream, grouped by stream
    for (uint32_t i = 0; lazy && i < ubatch.n_tokens; ++i) {
        const uint32_t strm = sinfo.strm[i/n_tps];
        const auto & pos = lz.pos[strm];
        if (!pos.empty() && (lz.seq[strm] != ubatch.seq_id[i][0] || (!lz.window && pos.size() >= lz.n_slots))) {
            must_flush = true;
        }
    }
    if (must_flush && lz.pending()) {
        flush_lazy(lctx, *kv);
    }
    lz.step_lazy = lazy;
}

void llama_kv_score_access::set_lazy_inputs(const llama_kv_cache_context * mctx, const llama_ubatch * ubatch,
                                            const llama_kv_policy_cfg & cfg, ggml_tensor * rows) {
    const llama_kv_cache & kv = *mctx->kv;
    auto & lz = kv.a2sf_units.lazy;
    const auto & sinfo = mctx->sinfos[mctx->i_cur];

    const int64_t n_tokens = ubatch->n_tokens;
    const int64_t n_store  = n_stored(lz, (uint32_t) n_tokens, sinfo.n_stream());
    const int64_t n_head   = rows->ne[0]/n_store;
    const int64_t n_slots  = lz.n_slots;

    // every token is a query of its stream; the last n_store are stored, query u of the
    // stream (counted since the last flush) in slot u % n_slots
    std::vector<int64_t> r(rows->ne[0]);
    const int64_t n_tps = n_tokens/sinfo.n_stream(); // tokens per stream, grouped by stream
    for (int64_t t = 0; t < n_tokens; ++t) {
        const uint32_t strm = sinfo.strm[t/n_tps];
        auto & pos = lz.pos[strm];
        const int64_t u = (int64_t) pos.size();
        GGML_ASSERT(lz.window || u < n_slots);
        pos.push_back(ubatch->pos[t]);
        lz.seq[strm] = ubatch->seq_id[t][0];
        lz.written[strm].push_back(sinfo.idxs[t/n_tps][t % n_tps]);
        const int64_t j = t - (n_tokens - n_store); // index among the stored tokens
        if (j < 0) {
            continue;
        }
        for (int64_t h = 0; h < n_head; ++h) {
            r[h + n_head*j] = u % n_slots + n_slots*(h + n_head*(int64_t) strm);
        }
    }
    ggml_backend_tensor_set(rows, r.data(), 0, r.size()*sizeof(int64_t));

    if (cfg.tracks_units()) {
        record_writes(kv, sinfo.s0, sinfo.idxs, *ubatch);
    }
}

bool llama_kv_score_access::build_store_queries(const llm_graph_context & g, const llama_kv_cache_context * mctx,
                                                ggml_tensor * q_cur, float kq_scale, int il) {
    const llama_kv_cache & kv = *mctx->kv;
    auto & lz = kv.a2sf_units.lazy;

    // the rings: one F32 [head_dim, n_slots, n_head, n_stream] per scored layer, in the
    // buffer type of the layer's K (so on the layer's device), zeroed so that unused slots
    // hold finite values
    const auto ids = scored_layer_ids(kv);
    if (lz.rings.size() != ids.size()) {
        GGML_ASSERT(!lz.pending());
        lz.rings.clear();
        lz.ctxs.clear();
        lz.bufs.clear();
        lz.kq_scale.assign(ids.size(), 1.0f);
        for (int32_t id : ids) {
            const auto & layer = kv.layers[kv.map_layer_ids.at(id)];
            ggml_init_params ip = { ggml_tensor_overhead(), nullptr, true };
            ggml_context_ptr ctx(ggml_init(ip));
            ggml_tensor * ring = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, kv.hparams.n_embd_head_k(id),
                                                    lz.n_slots, kv.hparams.n_head(id), (int64_t) kv.v_cells.size());
            ggml_format_name(ring, "a2sf_query_ring_l%d", id);
            ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), ggml_backend_buffer_get_type(layer.k->buffer)));
            if (!buf) {
                // nothing was deferred yet (the rings are made at the first scored layer
                // of the first lazy graph): score every step eagerly from now on
                LLAMA_LOG_WARN("%s: no memory for the query rings; scoring every ubatch eagerly\n", __func__);
                lz.rings.clear();
                lz.ctxs.clear();
                lz.bufs.clear();
                lz.no_memory = true;
                lz.step_lazy = false;
                return false;
            }
            ggml_backend_buffer_clear(buf.get(), 0);
            lz.rings.push_back(ring);
            lz.ctxs.push_back(std::move(ctx));
            lz.bufs.push_back(std::move(buf));
        }
    }
    size_t ls = 0;
    while (ls < ids.size() && ids[ls] != il) {
        ++ls;
    }
    GGML_ASSERT(ls < ids.size());
    lz.kq_scale[ls] = kq_scale;

    ggml_context * ctx0 = g.ctx0;

    const int64_t head_dim = q_cur->ne[0];
    const int64_t n_head   = q_cur->ne[1];
    const int64_t n_tokens = q_cur->ne[2];
    const int64_t n_store  = n_stored(lz, (uint32_t) n_tokens, mctx->sinfos[mctx->i_cur].n_stream());

    llm_graph_input_kv_lazy * inp = find_graph_input<llm_graph_input_kv_lazy>(g.res);
    if (inp == nullptr) {
        auto in = std::make_unique<llm_graph_input_kv_lazy>(mctx, g.cparams.kv_policy);
        in->n_head  = n_head;
        in->n_slots = lz.n_slots;
        in->rows    = ggml_new_tensor_1d(ctx0, GGML_TYPE_I64, n_head*n_store);
        ggml_set_input(in->rows);
        ggml_set_name(in->rows, "a2sf_inp_ring_rows");
        inp = static_cast<llm_graph_input_kv_lazy *>(g.res->add_input(std::move(in)));
    }
    GGML_ASSERT(inp->n_head == n_head);

    ggml_tensor * ring = lz.rings[ls];
    ggml_tensor * dst  = ggml_reshape_2d(ctx0, ring, head_dim, ggml_nelements(ring)/head_dim);
    // the stored tokens are the last n_store: Q [head_dim, n_head, n_tokens]
    ggml_tensor * q = n_store < n_tokens
        ? ggml_view_3d(ctx0, q_cur, head_dim, n_head, n_store, q_cur->nb[1], q_cur->nb[2], (n_tokens - n_store)*q_cur->nb[2])
        : q_cur;
    q = ggml_is_contiguous(q) ? q : ggml_cont(ctx0, q);
    q = ggml_reshape_2d(ctx0, q, head_dim, n_head*n_store);           // row h + n_head*t
    ggml_build_forward_expand(g.gf, ggml_set_rows(ctx0, dst, q, inp->rows));
    return true;
}

void llama_kv_score_access::drop_pending_queries(const llama_kv_cache & kv) {
    auto & lz = kv.a2sf_units.lazy;
    for (size_t s = 0; s < lz.pos.size(); ++s) {
        lz.pos[s].clear();
        lz.written[s].clear();
    }
}

void llama_kv_score_access::before_cells_change(const llama_kv_cache & kv, int32_t seq_id, int32_t p0, int32_t p1) {
    auto & lz = kv.a2sf_units.lazy;
    if (!lz.pending() || seq_id >= LLAMA_MAX_SEQ) {
        return; // (an out-of-range seq_id is llama.cpp's to refuse)
    }
    if (lz.owner == nullptr) {
        drop_pending_queries(kv);
        return;
    }
    // the cells' per-sequence position sets answer "any cell of seq in [lo, hi)" without a
    // scan: llama-cpp-python calls seq_rm on an empty range before every eval
    const llama_pos lo = p0 < 0 ? 0 : p0;
    const llama_pos hi = p1 < 0 ? std::numeric_limits<llama_pos>::max() : p1;
    bool touched = false;
    for (size_t s = 0; s < lz.pos.size() && !touched && lo < hi; ++s) {
        if (lz.pos[s].empty()) {
            continue;
        }
        const auto & cells = kv.v_cells[s];
        for (llama_seq_id sid = seq_id < 0 ? 0 : seq_id; sid < (seq_id < 0 ? LLAMA_MAX_SEQ : seq_id + 1) && !touched; ++sid) {
            const auto & ps = cells.seq_pos_get(sid);
            const auto it = ps.lower_bound({ lo, 0 });
            touched = it != ps.end() && it->first < hi;
        }
    }
    if (touched) {
        flush_lazy(*lz.owner, const_cast<llama_kv_cache &>(kv));
    }
}

bool llama_kv_score_access::flush_lazy(llama_context & lctx, llama_kv_cache & kv) {
    auto & lz = kv.a2sf_units.lazy;
    if (!lz.pending()) {
        return true;
    }
    const auto & cfg = lctx.cparams.kv_policy;
    const llama_hparams & hp = kv.hparams;
    const auto ids = scored_layer_ids(kv);

    const int64_t t0 = ggml_time_us();
    auto & st = state(lctx);

    bool ok = true;
    for (uint32_t strm = 0; strm < lz.pos.size(); ++strm) {
        auto & pos = lz.pos[strm];
        if (pos.empty()) {
            continue;
        }
        if (!cfg.scored() || lz.rings.size() != ids.size()) {
            pos.clear();
            lz.written[strm].clear();
            continue;
        }
        const llama_seq_id seq = lz.seq[strm];
        const auto & cells = kv.v_cells[strm];

        // the queries that count are the last n_rows; a window ring holds them all
        const size_t  n_used = pos.size();
        const size_t  n_rows = (size_t) cfg.rows_that_count((int64_t) n_used);
        const size_t  first  = n_used - n_rows;
        GGML_ASSERT(n_rows <= lz.n_slots);
        const int64_t n_kv   = std::max<int64_t>(1, cells.used_max_p1());

        const std::vector<float> pw = cfg.alpha_powers(n_used);

        // the causal mask each query had: F32 [n_kv, n_rows]
        std::vector<float> mask((size_t) n_kv*n_rows, -INFINITY);
        for (size_t t = 0; t < n_rows; ++t) {
            const llama_pos p1 = pos[first + t];
            for (int64_t c = 0; c < n_kv; ++c) {
                if (cells.is_empty(c) || !cells.seq_has(c, seq)) {
                    continue;
                }
                const llama_pos p0 = cells.pos_get(c);
                if (p0 > p1 || (kv.swa_type != LLAMA_SWA_TYPE_NONE && llama_hparams::is_masked_swa(kv.n_swa, kv.swa_type, p0, p1))) {
                    continue;
                }
                mask[(size_t) t*n_kv + c] = 0.0f;
            }
        }
        // query t is followed by n_used-1-t queries of its sequence
        std::vector<float> w(n_rows);
        for (size_t t = 0; t < n_rows; ++t) {
            w[t] = pw[n_used - 1 - (first + t)];
        }
        // their ring rows: query u of head h is row u % n_slots + n_slots*h of the stream's ring
        const int64_t n_head_q = hp.n_head(ids[0]);
        std::vector<int32_t> rows((size_t) n_rows*n_head_q);
        for (int64_t h = 0; h < n_head_q; ++h) {
            for (size_t t = 0; t < n_rows; ++t) {
                rows[t + n_rows*h] = (int32_t) ((first + t) % lz.n_slots + lz.n_slots*h);
            }
        }
        // the cells written since the last flush start from zero; the sequence's others
        // decay once per query; other sequences' cells are untouched
        std::vector<float> m(n_kv, 1.0f);
        for (int64_t c = 0; c < n_kv; ++c) {
            if (cells.is_empty(c)) {
                m[c] = 0.0f;
            } else if (cells.seq_has(c, seq)) {
                m[c] = pw[n_used];
            }
        }
        for (uint32_t c : lz.written[strm]) {
            if ((int64_t) c < n_kv) {
                m[c] = 0.0f;
            }
        }

        ok = compute_side_graph(lctx, "scores the pending decode queries", [&](ggml_context * ctx, ggml_cgraph * gf,
                                                                              llm_graph_input_side & inp) {
            ggml_tensor * tm = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, (int64_t) n_rows);
            ggml_tensor * tw = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, (int64_t) n_rows, 1, 1, 1);
            ggml_tensor * td = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, 1);
            ggml_tensor * tr = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) rows.size());
            for (ggml_tensor * t : { tm, tw, td, tr }) {
                ggml_set_input(t);
            }
            inp.f32.emplace_back(tm, std::move(mask));
            inp.f32.emplace_back(tw, std::move(w));
            inp.f32.emplace_back(td, std::move(m));
            inp.i32.emplace_back(tr, std::move(rows));

            for (size_t ls = 0; ls < ids.size(); ++ls) {
                const int32_t il = ids[ls];
                const auto & layer = kv.layers[kv.map_layer_ids.at(il)];
                const int64_t hd   = hp.n_embd_head_k(il);
                const int64_t nhkv = hp.n_head_kv(il);
                const int64_t nh   = hp.n_head(il);

                // K of the stream: [head_dim, n_head_kv, n_kv] -> [head_dim, n_kv, n_head_kv]
                ggml_tensor * k = ggml_view_3d(ctx, layer.k, hd, nhkv, n_kv, ggml_row_size(layer.k->type, hd),
                                               layer.k->nb[1], strm*layer.k->nb[2]);
                k = ggml_permute(ctx, k, 0, 2, 1, 3);

                // the ring's rows that count: [head_dim, n_rows, n_head]
                ggml_tensor * ring = lz.rings[ls];
                ggml_tensor * q = ggml_view_2d(ctx, ring, hd, ring->ne[1]*nh, ring->nb[1], strm*ring->nb[3]);
                q = ggml_get_rows(ctx, q, tr);

                // query head h reads KV head h/n_group, as in llama.cpp's attention: the
                // n_group heads of a KV head are adjacent, so [head_dim, n_rows*n_group, n_head_kv]
                // makes one product per KV head (K read once for all its query heads)
                q = ggml_reshape_3d(ctx, q, hd, (int64_t) n_rows*(nh/nhkv), nhkv);
                ggml_tensor * kq = ggml_mul_mat(ctx, k, q);                // [n_kv, n_rows*n_group, n_head_kv]
                ggml_prec_set_acc(kq, GGML_PREC_F32);
                kq = ggml_reshape_3d(ctx, kq, n_kv, (int64_t) n_rows, nh); // [n_kv, n_rows, n_head]
                ggml_tensor * probs = ggml_soft_max_ext(ctx, kq, tm, lz.kq_scale[ls], 0.0f);
                probs = ggml_reshape_4d(ctx, probs, n_kv, (int64_t) n_rows, nh, 1);

                build_score_add(ctx, gf, kv, il, probs, tw, td, strm, cfg.params.value_aware);
            }
        }) && ok;
        st.n_lazy_flushes++;
        st.n_lazy_queries += (int64_t) n_used;
        pos.clear();
        lz.written[strm].clear();
    }
    st.t_lazy_us += ggml_time_us() - t0;
    return ok;
}
