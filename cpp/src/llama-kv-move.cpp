// a2sf: move the rows of single (layer, KV head) units between cells, on the
// cache's backend.
//
// Granularity LAYER / HEAD frees one common set of cells while each unit keeps
// its own tokens: a unit's kept tokens inside the freed set move into its own
// holes (llama-kv-evict.cpp). For every scored layer this graph gathers the
// moving rows and scatters them to their new cells, per head:
//
//   K      [n_embd_head_k, n_head_kv*kv_size*n_stream]   row (strm*kv_size + c)*n_head_kv + h
//   V      same with n_embd_head_v (flash attention: V not transposed), or, for the
//          transposed V of the other path, one element per row:
//          [1, n_embd_v*kv_size*n_stream]                 element (strm*n_embd_v + h*hd + d)*kv_size + c
//   vnorm  [1, n_head_kv*kv_size*n_stream]                element (strm*kv_size + c)*n_head_kv + h
//   score  [1, kv_size*n_head_kv*n_stream]                element (strm*n_head_kv + h)*kv_size + c
//
// Sources and destinations never overlap (sources lie in the freed set), so one
// get_rows per tensor followed by one set_rows is exact. get_rows widens F16 /
// quantized rows to F32 and set_rows narrows them back, so F16 and F32 caches move
// bit for bit (quantized K/V are requantized). Computed through the context's
// scheduler, like llama.cpp's K-shift graph.
//
// A cache in host memory (the CPU backend) takes the same moves as plain copies
// instead: the graph needs one index per element of a transposed V (head_dim per
// moved row), and building and walking those indices cost more than the copies
// (measured: docs/PERFORMANCE.md, "Moving rows"). The copies are the rows' bytes,
// so quantized rows move exactly too.
// A2SF_MOVES_ON_GRAPH=1 forces the graph (tests compare the two).

#include "llama-kv-score.h"
#include "llama-kv-side-graph.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdlib>
#include <cstring>
#include <functional>


// Build (through `build`) and compute a small graph on the context's scheduler, as
// llama.cpp's K-shift does; the scheduler then holds this graph, so no graph of a
// previous decode may be reused.
bool llama_kv_score_access::compute_side_graph(llama_context & lctx, const char * what,
                                               const std::function<void(ggml_context *, ggml_cgraph *, llm_graph_input_side &)> & build) {
    lctx.synchronize();

    auto * sched = lctx.get_sched();
    ggml_backend_sched_reset(sched);

    auto * res = lctx.get_gf_res_reserve();
    res->reset();

    auto inp = std::make_unique<llm_graph_input_side>();
    build(res->get_ctx(), res->get_gf(), *inp);
    res->add_input(std::move(inp));

    bool ok = true;
    if (!ggml_backend_sched_alloc_graph(sched, res->get_gf())) {
        LLAMA_LOG_ERROR("%s: failed to allocate the graph that %s\n", __func__, what);
        ok = false;
    } else {
        res->set_inputs(nullptr);
        if (lctx.graph_compute(res->get_gf(), false) != GGML_STATUS_SUCCESS) {
            LLAMA_LOG_ERROR("%s: failed to compute the graph that %s\n", __func__, what);
            ok = false;
        }
    }
    lctx.synchronize();
    llama_kv_score_access::invalidate_graphs(lctx);
    return ok;
}

namespace {

// where the (cell c, head h) unit row of stream strm lies in each tensor (the layout above);
// the host copies and the graph's indices both take it from here
struct unit_layout {
    int64_t  kv_size;
    int64_t  nh;  // the layer's KV heads
    int64_t  hdv;
    int64_t  ne0; // rows of the transposed V per stream (as llama_kv_cache::set_input_v_idxs)
    uint32_t strm;

    int64_t row(uint32_t c, int64_t h) const { return (strm*kv_size + c)*nh + h; } // K, untransposed V, vnorm
    int64_t score(uint32_t c, int64_t h) const { return (strm*nh + h)*kv_size + c; }
    int64_t v_trans(int64_t h, int64_t d, uint32_t c) const { return (strm*ne0 + h*hdv + d)*kv_size + c; }
};

} // namespace

// every tensor the moves touch is in host memory, laid out as the graph below views it
bool llama_kv_score_access::moves_on_host(const llama_kv_cache & kv) {
    const char * force = getenv("A2SF_MOVES_ON_GRAPH");
    if (force != nullptr && force[0] != '\0' && force[0] != '0') {
        return false;
    }
    auto host = [](const ggml_tensor * t) {
        return t == nullptr || (t->buffer != nullptr && ggml_backend_buffer_is_host(t->buffer) && ggml_is_contiguous(t));
    };
    for (const auto & layer : kv.layers) {
        if (layer.score == nullptr) {
            continue;
        }
        if (!host(layer.k) || !host(layer.v) || !host(layer.vnorm) || !host(layer.score)) {
            return false;
        }
        // a head's row of K (of untransposed V) must be whole blocks of its type
        const int64_t hdk = kv.hparams.n_embd_head_k(layer.il);
        const int64_t hdv = kv.hparams.n_embd_head_v(layer.il);
        if (hdk % ggml_blck_size(layer.k->type) != 0 ||
            (layer.v && hdv % ggml_blck_size(layer.v->type) != 0) ||
            (layer.v && kv.v_trans && ggml_blck_size(layer.v->type) != 1)) {
            return false;
        }
    }
    return true;
}

bool llama_kv_score_access::move_unit_rows(llama_context & lctx, llama_kv_cache & kv, uint32_t strm,
                                           const std::vector<std::vector<std::pair<uint32_t, uint32_t>>> & moves) {
    const int64_t t0 = ggml_time_us();
    int64_t n_bytes = 0;

    const bool on_host = moves_on_host(kv);
    if (on_host) {
        lctx.synchronize(); // no computation may still write the cache
        const uint32_t nh_max = std::max<int32_t>(1, n_head_kv(kv));
        uint32_t il_scored = 0;
        for (const auto & layer : kv.layers) {
            if (layer.score == nullptr) {
                continue;
            }
            const uint32_t    il = layer.il;
            const unit_layout at{ (int64_t) kv.get_size(), layer.score->ne[1], kv.hparams.n_embd_head_v(il),
                                  kv.hparams.n_embd_v_gqa_max(), strm };
            const size_t k_row = ggml_row_size(layer.k->type, kv.hparams.n_embd_head_k(il));
            const size_t v_row = layer.v ? ggml_row_size(layer.v->type, at.hdv) : 0;
            const size_t v_el  = layer.v ? ggml_type_size(layer.v->type) : 0;
            const size_t n_el  = ggml_element_size(layer.vnorm);
            const size_t s_el  = ggml_element_size(layer.score);
            auto * k  = (uint8_t *) layer.k->data;
            auto * v  = layer.v ? (uint8_t *) layer.v->data : nullptr;
            auto * vn = (uint8_t *) layer.vnorm->data;
            auto * sc = (uint8_t *) layer.score->data;
            for (int64_t h = 0; h < at.nh; ++h) {
                const uint32_t unit = il_scored*nh_max + (uint32_t) h;
                if (unit >= moves.size()) {
                    continue;
                }
                for (const auto & [src, dst] : moves[unit]) {
                    const int64_t rs = at.row(src, h);
                    const int64_t rd = at.row(dst, h);
                    memcpy(k + rd*k_row, k + rs*k_row, k_row);
                    memcpy(vn + rd*n_el, vn + rs*n_el, n_el);
                    memcpy(sc + at.score(dst, h)*s_el, sc + at.score(src, h)*s_el, s_el);
                    if (v != nullptr && !kv.v_trans) {
                        memcpy(v + rd*v_row, v + rs*v_row, v_row);
                    }
                    n_bytes += (int64_t) (k_row + v_row);
                }
                // transposed V: a row per channel, a cell per element; each row takes all the
                // moves before the next (the rows lie kv_size elements apart)
                if (v != nullptr && kv.v_trans) {
                    for (int64_t d = 0; d < at.hdv; ++d) {
                        uint8_t * row = v + at.v_trans(h, d, 0)*v_el;
                        if (v_el == 2) {
                            auto * r16 = (uint16_t *) row;
                            for (const auto & [src, dst] : moves[unit]) {
                                r16[dst] = r16[src];
                            }
                        } else {
                            for (const auto & [src, dst] : moves[unit]) {
                                memcpy(row + dst*v_el, row + src*v_el, v_el);
                            }
                        }
                    }
                }
            }
            ++il_scored;
        }
    }

    const bool ok = on_host || compute_side_graph(lctx, "moves KV rows", [&](ggml_context * ctx, ggml_cgraph * gf,
                                                                             llm_graph_input_side & inp) {
        const uint32_t nh_max  = std::max<int32_t>(1, n_head_kv(kv));

        // one gather + scatter of `rows` rows of width `width` of tensor t (viewed 2-D)
        auto move = [&](ggml_tensor * t, int64_t width, std::vector<int32_t> src, std::vector<int64_t> dst) {
            if (src.empty()) {
                return;
            }
            ggml_tensor * view = ggml_reshape_2d(ctx, t, width, ggml_nelements(t)/width);
            ggml_tensor * is = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) src.size());
            ggml_tensor * id = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, (int64_t) dst.size());
            ggml_set_input(is);
            ggml_set_input(id);
            ggml_tensor * rows = ggml_get_rows(ctx, view, is);
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, view, rows, id));
            inp.i32.emplace_back(is, std::move(src));
            inp.i64.emplace_back(id, std::move(dst));
        };

        uint32_t il_scored = 0;
        for (const auto & layer : kv.layers) {
            if (layer.score == nullptr) {
                continue;
            }
            const uint32_t    il  = layer.il;
            const int64_t     hdk = kv.hparams.n_embd_head_k(il);
            const int64_t     hdv = kv.hparams.n_embd_head_v(il);
            const unit_layout at{ (int64_t) kv.get_size(), layer.score->ne[1], hdv, kv.hparams.n_embd_v_gqa_max(), strm };

            std::vector<int32_t> k_src, s_src, v_src;
            std::vector<int64_t> k_dst, s_dst, v_dst;
            for (int64_t h = 0; h < at.nh; ++h) {
                const uint32_t unit = il_scored*nh_max + (uint32_t) h;
                if (unit >= moves.size()) {
                    continue;
                }
                for (const auto & [src, dst] : moves[unit]) {
                    k_src.push_back((int32_t) at.row(src, h));
                    k_dst.push_back(at.row(dst, h));
                    s_src.push_back((int32_t) at.score(src, h));
                    s_dst.push_back(at.score(dst, h));
                    if (kv.v_trans && layer.v) {
                        for (int64_t d = 0; d < hdv; ++d) {
                            v_src.push_back((int32_t) at.v_trans(h, d, src));
                            v_dst.push_back(at.v_trans(h, d, dst));
                        }
                    }
                }
            }
            if (k_src.empty()) {
                ++il_scored;
                continue;
            }
            n_bytes += (int64_t) k_src.size()*(ggml_row_size(layer.k->type, hdk) + (layer.v ? ggml_row_size(layer.v->type, hdv) : 0));

            move(layer.k, hdk, k_src, k_dst);
            if (layer.v) {
                if (kv.v_trans) {
                    move(layer.v, 1, v_src, v_dst);
                } else {
                    move(layer.v, hdv, k_src, k_dst);
                }
            }
            move(layer.vnorm, 1, k_src, k_dst);
            move(layer.score, 1, s_src, s_dst);
            ++il_scored;
        }
    });

    auto & st = lctx.kv_score;
    st.n_move_events += ok;
    st.n_host_moves  += on_host;
    st.n_bytes_moved += ok ? n_bytes : 0;
    st.t_move_us     += ggml_time_us() - t0;

    return ok;
}

bool llama_kv_score_access::rotate_unit_rows(llama_context & lctx, llama_kv_cache & kv, uint32_t strm,
                                             const std::vector<std::vector<int32_t>> & deltas) {
    const int64_t kv_size = kv.get_size();
    const uint32_t nh_max = std::max<int32_t>(1, n_head_kv(kv));
    const auto & cparams  = lctx.cparams;

    return compute_side_graph(lctx, "re-rotates K per layer and head", [&](ggml_context * ctx, ggml_cgraph * gf,
                                                                          llm_graph_input_side & inp) {
        // a quantized K is stored Hadamard-rotated (llama.cpp's attn_rot_k): build_rope_shift
        // un-rotates, shifts and rotates it back with this F32 [n, n] matrix, as llama.cpp's own
        // K-shift graph does (nullptr: K is not quantized; compact_seq refuses a quantized K
        // stored without it)
        ggml_tensor * k_rot = kv.build_input_k_rot(ctx);
        if (k_rot != nullptr) {
            inp.f32.emplace_back(k_rot, kv.attn_rot_hadamard.at(k_rot->ne[0]));
        }
        uint32_t il_scored = 0;
        for (const auto & layer : kv.layers) {
            if (layer.score == nullptr) {
                continue;
            }
            const uint32_t il = layer.il;
            const int64_t  nh = layer.score->ne[1];
            if (!kv.hparams.has_rope(il)) {
                ++il_scored;
                continue;
            }
            const int64_t n_rot  = kv.hparams.n_rot(il);
            const int64_t hdk    = kv.hparams.n_embd_head_k(il);
            const int64_t nope   = kv.hparams.n_lora_kv > 0 ? hdk - n_rot : 0;
            const int64_t n_rows = nh*kv_size*(int64_t) kv.v_cells.size();

            // one position shift per (cell, head) row: K viewed as n_rows "tokens" of one head
            std::vector<int32_t> shift(n_rows, 0);
            bool any = false;
            for (int64_t h = 0; h < nh; ++h) {
                const auto & d = deltas[il_scored*nh_max + h];
                for (int64_t c = 0; c < kv_size; ++c) {
                    shift[(strm*kv_size + c)*nh + h] = d[c];
                    any |= d[c] != 0;
                }
            }
            ++il_scored;
            if (!any) {
                continue;
            }
            ggml_tensor * k = ggml_view_3d(ctx, layer.k, n_rot, 1, n_rows,
                                           ggml_row_size(layer.k->type, hdk), ggml_row_size(layer.k->type, hdk),
                                           ggml_row_size(layer.k->type, nope));
            ggml_tensor * pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_rows);
            ggml_set_input(pos);
            inp.i32.emplace_back(pos, std::move(shift));
            ggml_build_forward_expand(gf, kv.build_rope_shift(cparams, ctx, k, pos, k_rot,
                                                              kv.model.get_rope_factors(cparams, il),
                                                              kv.model.get_rope_freq_base(cparams, il),
                                                              kv.model.get_rope_freq_scale(cparams, il), il));
        }
    });
}
