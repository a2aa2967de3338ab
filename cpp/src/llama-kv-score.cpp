// a2sf: accumulated attention scores, updated by ggml ops inside the compute graph.
//
// Per KV layer the cache holds an F32 score per cell and stream, allocated in the
// same buffer type as that layer's K (so it lives on the GPU in CUDA builds). For
// a ubatch of n queries the graph computes
//
//     S <- m * S + sum_q w_q * sum_heads P[q, head, cell]      (* |V_cell|_1 for VATP)
//
// where P is the softmax attention, w_q = alpha^(n-1-q) and m = alpha^n for cells
// that were there before this ubatch and 0 for the cells it writes (their old
// score belonged to an evicted token). w and m are host-filled inputs, so alpha
// never has to be baked into the graph.

#include "llama-kv-score.h"
#include "llama-kv-side-graph.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <utility>
#include <vector>

namespace {

// Bounded prefill scoring: in a ubatch with one sequence per stream, query row t weighs
// alpha^(n-1-t), so only the last rows that count are scored (llama_kv_policy_cfg::rows_that_count).
int64_t score_rows(const llama_kv_policy_cfg & cfg, const llama_ubatch & ub, int64_t n_tps, int64_t n_stream) {
    if (ub.n_seqs_unq != (uint32_t) n_stream) {
        return n_tps; // several sequences per stream: their weights interleave
    }
    return cfg.rows_that_count(n_tps);
}


// The host-side inputs of the scoring ops; one per graph, shared by every layer.
class llm_graph_input_kv_score : public llm_graph_input_i {
public:
    llm_graph_input_kv_score(const llama_kv_cache_context * mctx, const llama_kv_policy_cfg & cfg) : mctx(mctx), cfg(cfg) {}

    void set_input(const llama_ubatch * ubatch) override {
        llama_kv_score_access::set_score_inputs(mctx, ubatch, cfg, w, m);
    }

    bool can_reuse(const llm_graph_params & params) override {
        mctx = llama_kv_score_access::base_context(params.mctx);
        const int64_t n_stream = w->ne[3];
        return !llama_kv_score_access::lazy_step(mctx) &&
               w->ne[0]*n_stream == (int64_t) params.ubatch.n_tokens &&
               m->ne[0] == (int64_t) mctx->get_n_kv() &&
               score_rows(cfg, params.ubatch, w->ne[0], n_stream) == n_rows;
    }

    int64_t n_rows = 0; // query rows per stream that the graph scores (score_rows)

    ggml_tensor * w = nullptr; // F32 [n_tokens/n_stream, 1, 1, n_stream]: weight of each query
    ggml_tensor * m = nullptr; // F32 [n_kv, n_stream]: decay of each cell's old score

    const llama_kv_cache_context * mctx;
    const llama_kv_policy_cfg cfg; // the graph was built for it (graph reuse compares it)
};

// In the non-flash-attention path llama.cpp already materialises the softmax
// probabilities: find them a few nodes below the attention output (the node chain
// is cont <- permute <- mul_mat(v, kq)) instead of computing them twice.
ggml_tensor * find_soft_max(ggml_tensor * t, int depth) {
    if (t == nullptr || depth < 0) {
        return nullptr;
    }
    if (t->op == GGML_OP_SOFT_MAX) {
        return t;
    }
    if (t->op == GGML_OP_FLASH_ATTN_EXT) {
        return nullptr;
    }
    for (int i = 0; i < GGML_MAX_SRC; ++i) {
        if (ggml_tensor * r = find_soft_max(t->src[i], depth - 1)) {
            return r;
        }
    }
    return nullptr;
}

} // namespace

void llama_kv_score_access::set_score_inputs(const llama_kv_cache_context * mctx, const llama_ubatch * ubatch,
                                             const llama_kv_policy_cfg & cfg, ggml_tensor * w, ggml_tensor * m) {
    GGML_ASSERT(ggml_backend_buffer_is_host(w->buffer));
    GGML_ASSERT(ggml_backend_buffer_is_host(m->buffer));

    const auto & sinfo = mctx->sinfos[mctx->i_cur];
    const llama_kv_cache & kv = *mctx->kv;

    const int64_t n_stream = w->ne[3];
    const int64_t n_tps    = w->ne[0]; // tokens per stream
    const int64_t n_kv     = m->ne[0];

    GGML_ASSERT(n_stream == (int64_t) sinfo.n_stream());

    float * wd = (float *) w->data;
    float * md = (float *) m->data;

    // alpha^k for every k a ubatch can need
    const std::vector<float> pw = cfg.alpha_powers(ubatch->n_tokens);

    std::vector<llama_seq_id> seqs;     // sequences of the stream's tokens
    std::vector<int32_t>      seq_n;    // number of tokens of each
    std::vector<uint8_t>      is_new(n_kv);

    for (int64_t s = 0; s < n_stream; ++s) {
        const int64_t t0 = s*n_tps;

        seqs.clear();
        seq_n.clear();

        // w: a query is followed by (count of later queries of its sequence) steps
        for (int64_t t = n_tps - 1; t >= 0; --t) {
            const llama_seq_id sid = ubatch->seq_id[t0 + t][0];
            size_t j = 0;
            while (j < seqs.size() && seqs[j] != sid) {
                ++j;
            }
            if (j == seqs.size()) {
                seqs.push_back(sid);
                seq_n.push_back(0);
            }
            wd[t0 + t] = pw[seq_n[j]];
            seq_n[j]++;
        }

        // m: cells written by this ubatch start from zero; the others decay by
        // alpha once per query that can attend to them
        std::fill(is_new.begin(), is_new.end(), 0);
        for (uint32_t idx : sinfo.idxs[s]) {
            if ((int64_t) idx < n_kv) {
                is_new[idx] = 1;
            }
        }

        const auto & cells = kv.v_cells[sinfo.s0 + s];
        float * ms = md + s*n_kv;

        for (int64_t c = 0; c < n_kv; ++c) {
            if (is_new[c] || cells.is_empty(c)) {
                ms[c] = 0.0f;
                continue;
            }
            int32_t n_seen = 0;
            for (size_t j = 0; j < seqs.size(); ++j) {
                if (cells.seq_has(c, seqs[j])) {
                    n_seen += seq_n[j];
                }
            }
            ms[c] = pw[n_seen];
        }
    }

    if (cfg.tracks_units()) {
        record_writes(kv, sinfo.s0, sinfo.idxs, *ubatch);
    }
}

const llama_kv_cache_context * llama_kv_score_access::base_context(const llama_memory_context_i * mctx) {
    if (const auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx)) {
        return iswa->get_base();
    }
    return dynamic_cast<const llama_kv_cache_context *>(mctx); // nullptr: not a KV cache's context
}

bool llama_kv_score_access::is_swa_cache(const llama_kv_cache & kv) {
    if (kv.swa_type == LLAMA_SWA_TYPE_NONE) {
        return false;
    }
    // the sliding-window half of an iSWA pair: the model has global layers elsewhere
    // (a model whose every layer is sliding-window keeps one cache, and scores it)
    for (uint32_t il = 0; il < kv.hparams.n_layer(); ++il) {
        if (!kv.hparams.is_swa(il)) {
            return true;
        }
    }
    return false;
}

void llama_kv_score_access::alloc_layer(llama_kv_cache & kv, ggml_context * ctx, uint32_t il, uint32_t kv_size, uint32_t n_stream) {
    auto & layer = kv.layers[kv.map_layer_ids.at(il)];

    // the SWA cache of an iSWA memory keeps its window as llama.cpp does: no scores
    if (is_swa_cache(kv)) {
        return;
    }

    layer.score = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kv_size, kv.hparams.n_head_kv(il), n_stream);
    layer.vnorm = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kv.hparams.n_head_kv(il), kv_size, n_stream);

    ggml_format_name(layer.score, "cache_score_l%d", il);
    ggml_format_name(layer.vnorm, "cache_vnorm_l%d", il);
}

void llama_kv_score_access::copy_stream(llama_kv_cache & kv, uint32_t ssrc, uint32_t sdst) {
    GGML_ASSERT(ssrc != sdst);
    std::vector<uint8_t> buf;
    for (auto & layer : kv.layers) {
        // score [kv_size, n_head_kv, n_stream], vnorm [n_head_kv, kv_size, n_stream]:
        // the stream is the outermost dimension, one contiguous slice per stream
        const std::pair<ggml_tensor *, int> rows[] = { { layer.score, 2 }, { layer.vnorm, 2 } };
        for (const auto & [t, d] : rows) {
            if (t == nullptr) {
                continue;
            }
            const size_t nb = t->nb[d];
            GGML_ASSERT(ssrc < (uint32_t) t->ne[d] && sdst < (uint32_t) t->ne[d]);
            buf.resize(nb);
            ggml_backend_tensor_get(t, buf.data(), ssrc*nb, nb);
            ggml_backend_tensor_set(t, buf.data(), sdst*nb, nb);
        }
    }
    copy_stream_units(kv, ssrc, sdst);
}

uint32_t llama_kv_score_access::graph_nodes_per_layer() {
    return 32;
}

void llama_kv_score_access::build_store_vnorm(const llm_graph_context & g, const llama_kv_cache_context * mctx,
                                              ggml_tensor * v_cur, ggml_tensor * k_idxs, int il) {
    const auto & cfg = g.cparams.kv_policy;
    if (!cfg.scored() || !cfg.params.value_aware || v_cur == nullptr) {
        return;
    }

    const llama_kv_cache & kv = *mctx->kv;
    const auto & layer = kv.layers[kv.map_layer_ids.at(il)];
    if (layer.vnorm == nullptr) {
        return;
    }

    ggml_context * ctx0 = g.ctx0;

    const int64_t n_head_kv = v_cur->ne[1];
    const int64_t n_tokens  = v_cur->ne[2];

    ggml_tensor * v = ggml_is_contiguous(v_cur) ? v_cur : ggml_cont(ctx0, v_cur);
    if (v->type != GGML_TYPE_F32) {
        v = ggml_cast(ctx0, v, GGML_TYPE_F32);
    }

    // a quantized V is stored Hadamard-rotated (llama.cpp's attn_rot_v), and v_cur arrives
    // rotated; VATP's L1 norm is not rotation-invariant, so it is taken of the value the model
    // computed: the orthonormal, symmetric rotation is its own inverse
    ggml_tensor * v_rot = nullptr;
    if (const auto * in = find_graph_input<llm_graph_input_attn_kv>(g.res)) {
        v_rot = in->self_v_rot;
    } else if (const auto * in_iswa = find_graph_input<llm_graph_input_attn_kv_iswa>(g.res)) {
        v_rot = in_iswa->self_v_rot; // the base (global) cache's: the scored layers
    }
    if (v_rot != nullptr) {
        v = llama_mul_mat_hadamard(ctx0, v, v_rot);
    }

    // L1 norm of each head's value vector: [1, n_head_kv, n_tokens]
    ggml_tensor * vn = ggml_sum_rows(ctx0, ggml_abs(ctx0, v));
    vn = ggml_reshape_2d(ctx0, vn, n_head_kv, n_tokens);

    // one row per cell, addressed like the K rows (k_idxs are global over the streams)
    ggml_tensor * dst = ggml_reshape_2d(ctx0, layer.vnorm, layer.vnorm->ne[0], layer.vnorm->ne[1]*layer.vnorm->ne[2]);

    ggml_build_forward_expand(g.gf, ggml_set_rows(ctx0, dst, vn, k_idxs));
}

bool llama_kv_score_access::attn_unfused(const llm_graph_context & g, int il) {
    const auto & cfg = g.cparams.kv_policy;
    if (!cfg.scored() || g.cparams.training || g.mctx == nullptr) {
        return false;
    }
    const llama_kv_cache_context * mctx = base_context(g.mctx);
    if (mctx == nullptr) {
        return false;
    }
    const llama_kv_cache & kv = *mctx->kv;
    const auto it = kv.map_layer_ids.find(il);
    if (it == kv.map_layer_ids.end() || kv.layers[it->second].score == nullptr || kv.a2sf_units.lazy.step_lazy) {
        return false;
    }
    // A ubatch of a few tokens keeps the fused kernel: the unfused path copies the whole V
    // to transpose it (a flash-attention cache stores V untransposed), a pass that a few
    // recomputed probability rows may not repay. On the CPU the unfused path is faster
    // even for one query where ggml runs AVX-512 kernels on an Intel CPU (faster than
    // vanilla flash attention itself, docs/PERFORMANCE.md), so decode_scoring "auto" takes
    // it at every size there; elsewhere, and with "eager", a decode step keeps the fused
    // kernel plus the product (cpu_unfused_decode_faster).
    const int64_t n_stream = mctx->sinfos[mctx->i_cur].n_stream();
    const int64_t n_tps    = g.ubatch.n_tokens/n_stream;
    const int64_t min_rows = unfused_host_decode(cfg, kv) ? 1 : 16;
    return v_transposable(kv) && n_tps >= min_rows && score_rows(cfg, g.ubatch, n_tps, n_stream) == n_tps;
}

bool llama_kv_score_access::eager_host_decode(const llama_kv_policy_cfg & cfg, const llama_kv_cache & kv) {
    return cfg.eager_host_decode() && scores_on_host(kv) && v_transposable(kv);
}

bool llama_kv_score_access::unfused_host_decode(const llama_kv_policy_cfg & cfg, const llama_kv_cache & kv) {
    return eager_host_decode(cfg, kv) && cpu_unfused_decode_faster();
}

// "GenuineIntel" in CPUID leaf 0 (x86 only; false elsewhere)
static bool cpu_vendor_is_intel() {
#if defined(__x86_64__) || defined(__i386__)
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) {
        return false;
    }
    char vendor[13];
    memcpy(vendor + 0, &ebx, 4);
    memcpy(vendor + 4, &edx, 4);
    memcpy(vendor + 8, &ecx, 4);
    vendor[12] = '\0';
    return strcmp(vendor, "GenuineIntel") == 0;
#else
    return false;
#endif
}

// Which of llama.cpp's CPU attentions is faster for one query depends on the CPU
// (measured on three machines; the figures are in docs/PERFORMANCE.md, where "auto" decode
// depends on the CPU): on an Intel Xeon with AVX-512 (AMX) the unfused step beats the fused
// kernel plus the score product; on AMD EPYCs it is much slower, with AVX2 alone and with
// AVX-512 alike (Zen 4): there the strided copy of V transposed that the unfused path makes
// each step (a large share of the run in memmove) outweighs the fused kernel's slower
// single-query product. So the unfused step is taken where ggml runs AVX-512 kernels on an
// Intel CPU. The choice is made once per process, not timed, so a machine always decodes the
// same tokens; A2SF_AUTO_DECODE_UNFUSED=1 or 0 overrides it (to measure both on a new CPU,
// and for the tests of either path).
bool llama_kv_score_access::cpu_unfused_decode_faster() {
    static const bool faster = [] {
        const char * env = getenv("A2SF_AUTO_DECODE_UNFUSED");
        if (env != nullptr && (strcmp(env, "0") == 0 || strcmp(env, "1") == 0)) {
            return env[0] == '1';
        }
        ggml_backend_reg_t reg = ggml_backend_reg_by_name("CPU");
        if (reg == nullptr) {
            return false;
        }
        auto get_features = (ggml_backend_get_features_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features");
        if (get_features == nullptr) {
            return false;
        }
        for (const ggml_backend_feature * f = get_features(reg); f != nullptr && f->name != nullptr; ++f) {
            if (strcmp(f->name, "AVX512") == 0) {
                return cpu_vendor_is_intel();
            }
        }
        return false;
    }();
    return faster;
}

bool llama_kv_score_access::v_transposable(const llama_kv_cache & kv) {
    for (const auto & layer : kv.layers) {
        if (layer.score != nullptr && layer.v != nullptr && ggml_is_quantized(layer.v->type)) {
            return false;
        }
    }
    return true;
}

bool llama_kv_score_access::scores_on_host(const llama_kv_cache & kv) {
    bool any = false;
    for (const auto & layer : kv.layers) {
        if (layer.score == nullptr) {
            continue;
        }
        if (layer.k->buffer == nullptr || !ggml_backend_buffer_is_host(layer.k->buffer)) {
            return false;
        }
        any = true;
    }
    return any;
}

void llama_kv_score_access::build_update(const llm_graph_context & g, const llm_graph_input_attn_kv * inp,
                                         ggml_tensor * q_cur, ggml_tensor * k, ggml_tensor * kq_mask,
                                         float kq_scale, ggml_tensor * attn_out, int il) {
    build_update(g, inp->mctx, q_cur, k, kq_mask, kq_scale, attn_out, il);
}

void llama_kv_score_access::build_update(const llm_graph_context & g, const llama_kv_cache_context * mctx,
                                         ggml_tensor * q_cur, ggml_tensor * k, ggml_tensor * kq_mask,
                                         float kq_scale, ggml_tensor * attn_out, int il) {
    const auto & cfg = g.cparams.kv_policy;
    if (!cfg.scored()) {
        return;
    }

    const llama_kv_cache & kv = *mctx->kv;
    const auto & layer = kv.layers[kv.map_layer_ids.at(il)];
    if (layer.score == nullptr) {
        return;
    }

    if (kv.a2sf_units.lazy.step_lazy) {
        // a lazy decode step: only keep the queries, scored later in one product
        if (build_store_queries(g, mctx, q_cur, kq_scale, il)) {
            return;
        }
    }

    ggml_context * ctx0 = g.ctx0;

    // the query rows that count (all but the far past of a long ubatch for alpha < 1)
    const int64_t n_stream_q = k->ne[3];
    const int64_t n_tps_all  = q_cur->ne[2]/n_stream_q;
    const int64_t n_rows     = score_rows(cfg, g.ubatch, n_tps_all, n_stream_q);
    const int64_t row0       = n_tps_all - n_rows;

    // the probabilities [n_kv, n_rows, n_head, n_stream]
    ggml_tensor * probs = find_soft_max(attn_out, 5);
    if (probs != nullptr && n_rows < n_tps_all) {
        probs = ggml_cont(ctx0, ggml_view_4d(ctx0, probs, probs->ne[0], n_rows, probs->ne[2], probs->ne[3],
                                             probs->nb[1], probs->nb[2], probs->nb[3], row0*probs->nb[1]));
    }
    if (probs == nullptr) {
        // flash attention never materialises them: compute them the way build_attn_mha
        // would without flash attention (same mask, same scale)
        const int64_t n_stream     = k->ne[3];
        const int64_t n_kv_head    = k->ne[1];   // k: [head_dim, n_head_kv, n_kv, n_stream]
        const int64_t n_q_head     = q_cur->ne[1];
        const int64_t n_tps_q      = q_cur->ne[2]/n_stream;
        ggml_tensor * kp = ggml_permute(ctx0, k, 0, 2, 1, 3); // [head_dim, n_kv, n_head_kv, n_stream]

        ggml_tensor * kq = nullptr;
        if (n_tps_q == 1 && n_q_head % n_kv_head == 0 && ggml_is_contiguous(q_cur)) {
            // decode: the query heads that share a KV head become the columns of one
            // product, so K is read once per KV head rather than once per query head
            // (this extra pass over K is the whole cost of scoring with flash attention)
            ggml_tensor * q = ggml_reshape_4d(ctx0, q_cur, q_cur->ne[0], n_q_head/n_kv_head, n_kv_head, n_stream);
            kq = ggml_mul_mat(ctx0, kp, q);                                      // [n_kv, n_group, n_head_kv, n_stream]
            kq = ggml_reshape_4d(ctx0, kq, kq->ne[0], 1, n_q_head, n_stream);    // head h = g + n_group*h_kv
        } else {
            // only the rows that count: the last n_rows queries of each stream, and their mask rows
            ggml_tensor * q = ggml_view_4d(ctx0, q_cur, q_cur->ne[0], n_q_head, n_rows, n_stream,
                                           q_cur->nb[1], q_cur->nb[2], q_cur->nb[2]*n_tps_q, q_cur->nb[2]*row0);
            q = ggml_permute(ctx0, q, 0, 2, 1, 3);
            kq = ggml_mul_mat(ctx0, kp, q);
            if (n_rows < n_tps_q) {
                kq_mask = ggml_cont(ctx0, ggml_view_4d(ctx0, kq_mask, kq_mask->ne[0], n_rows, kq_mask->ne[2],
                                                       kq_mask->ne[3], kq_mask->nb[1], kq_mask->nb[2],
                                                       kq_mask->nb[3], row0*kq_mask->nb[1]));
            }
        }
        ggml_prec_set_acc(kq, GGML_PREC_F32);

        probs = ggml_soft_max_ext(ctx0, kq, kq_mask, kq_scale, g.hparams.f_max_alibi_bias);
    }

    const int64_t n_kv      = probs->ne[0];
    const int64_t n_stream  = probs->ne[3];

    const uint32_t s0 = mctx->sinfos[mctx->i_cur].s0;

    // the inputs are shared by all layers of the graph
    llm_graph_input_kv_score * inp_score = find_graph_input<llm_graph_input_kv_score>(g.res);
    if (inp_score == nullptr) {
        auto in = std::make_unique<llm_graph_input_kv_score>(mctx, cfg);
        in->n_rows = n_rows;
        in->w = ggml_new_tensor_4d(ctx0, GGML_TYPE_F32, n_tps_all, 1, 1, n_stream);
        in->m = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, n_kv, n_stream);
        ggml_set_input(in->w);
        ggml_set_input(in->m);
        ggml_set_name(in->w, "a2sf_inp_query_weight");
        ggml_set_name(in->m, "a2sf_inp_cell_decay");
        inp_score = static_cast<llm_graph_input_kv_score *>(g.res->add_input(std::move(in)));
    }

    build_score_add(ctx0, g.gf, kv, il, probs, inp_score->w, inp_score->m, s0, cfg.params.value_aware);
}

void llama_kv_score_access::build_score_add(ggml_context * ctx0, ggml_cgraph * gf, const llama_kv_cache & kv, int il,
                                            ggml_tensor * probs, ggml_tensor * w, ggml_tensor * m, uint32_t s0,
                                            bool value_aware) {
    // probs F32 [n_kv, n_tps, n_head, n_stream]: attention of the rows that count;
    // w F32 [>= n_tps, 1, 1, n_stream]: query weights, the last n_tps are these rows';
    // m F32 [n_kv, n_stream]: decay of each cell's old score
    const auto & layer = kv.layers[kv.map_layer_ids.at(il)];

    const int64_t n_kv      = probs->ne[0];
    const int64_t n_tps     = probs->ne[1];
    const int64_t n_head    = probs->ne[2];
    const int64_t n_stream  = probs->ne[3];
    const int64_t n_head_kv = kv.hparams.n_head_kv(il);
    const int64_t n_group   = n_head/n_head_kv;

    if (value_aware) {
        // VATP: attention times the L1 norm of the cell's value vector of the head's KV group.
        // head h reads KV head h/n_group, so [n_tps, n_head] regroups as [n_tps*n_group, n_head_kv]
        ggml_tensor * vn = ggml_view_3d(ctx0, layer.vnorm, n_head_kv, n_kv, n_stream,
                                        layer.vnorm->nb[1], layer.vnorm->nb[2], layer.vnorm->nb[2]*s0);
        vn = ggml_cont(ctx0, ggml_transpose(ctx0, vn));            // [n_kv, n_head_kv, n_stream]
        vn = ggml_reshape_4d(ctx0, vn, n_kv, 1, n_head_kv, n_stream);

        ggml_tensor * p4 = ggml_reshape_4d(ctx0, probs, n_kv, n_tps*n_group, n_head_kv, n_stream);
        probs = ggml_mul(ctx0, p4, vn);
    }

    // per KV head, sum over its queries (weighted) and the query heads of its group in
    // one pass: out_prod contracts dim 1. Query head h reads KV head h/n_group, so
    // [n_tps, n_head] regroups as [n_tps*n_group, n_head_kv] (index t + n_tps*g).
    ggml_tensor * p4 = ggml_reshape_4d(ctx0, probs, n_kv, n_tps*n_group, n_head_kv, n_stream);
    // the weights of the rows that count
    if (n_tps < w->ne[0]) {
        w = ggml_view_4d(ctx0, w, n_tps, 1, 1, n_stream, w->nb[1], w->nb[2], w->nb[3], (w->ne[0] - n_tps)*w->nb[0]);
    }
    ggml_tensor * wq = ggml_repeat_4d(ctx0, w, n_tps, n_group, n_head_kv, n_stream);
    wq = ggml_reshape_4d(ctx0, wq, 1, n_tps*n_group, n_head_kv, n_stream);

    // the CPU out_prod splits its output rows among the threads, and there is one row per
    // KV head (3 for SmolLM2): cut each into n_chunk pieces of cells, so the single pass
    // over the probabilities, which dominates scoring with the unfused attention, runs
    // on every thread. The pieces lie end to end, so the result's layout is unchanged.
    // (Device backends compute out_prod as one GEMM: one chunk.)
    const int64_t n_chunk = ggml_backend_buffer_is_host(layer.score->buffer) && n_kv % 8 == 0 ? 8 : 1;
    ggml_tensor * pc = ggml_view_4d(ctx0, p4, n_kv/n_chunk, n_tps*n_group, n_chunk, n_head_kv*n_stream,
                                    p4->nb[1], (n_kv/n_chunk)*p4->nb[0], p4->nb[2], 0); // [n_kv/n_chunk, R, n_chunk, n_head_kv*n_stream]
    ggml_tensor * wc = ggml_reshape_4d(ctx0, wq, 1, n_tps*n_group, 1, n_head_kv*n_stream);
    if (n_chunk > 1) {
        wc = ggml_repeat_4d(ctx0, wc, 1, n_tps*n_group, n_chunk, n_head_kv*n_stream);
    }
    ggml_tensor * contrib = ggml_out_prod(ctx0, pc, wc);               // [n_kv/n_chunk, 1, n_chunk, n_head_kv*n_stream]
    contrib = ggml_reshape_3d(ctx0, contrib, n_kv, n_head_kv, n_stream);

    // score: F32 [kv_size, n_head_kv, n_stream]; the first n_kv cells of the ubatch's streams
    ggml_tensor * s_old = ggml_view_3d(ctx0, layer.score, n_kv, n_head_kv, n_stream,
                                       layer.score->nb[1], layer.score->nb[2], layer.score->nb[2]*s0);
    ggml_tensor * m3    = ggml_reshape_3d(ctx0, m, n_kv, 1, n_stream);
    ggml_tensor * s_new = ggml_add(ctx0, ggml_mul(ctx0, s_old, m3), contrib);

    ggml_set_name(s_new, "a2sf_score");
    ggml_build_forward_expand(gf, ggml_cpy(ctx0, s_new, s_old));
}
