// a2sf: per-cell attention scores beside K/V, and eviction when the cache is full.
//
// llama.cpp's own files only call the hooks declared here (see cpp/patches/);
// all of the logic lives in llama-kv-score.cpp (graph), llama-kv-evict.cpp
// (eviction) and llama-kv-policy.cpp (the C API).
#pragma once

#include "llama-kv-policy-cfg.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct llama_context;
struct llama_ubatch;
struct llm_graph_context;
struct llm_graph_params;
struct llm_graph_input_side;
class  llm_graph_input_attn_kv;
class  llama_kv_cache;
class  llama_kv_cells;
class  llama_kv_cache_context;
class  llama_memory_context_i;
class  llama_batch_allocr;

// Runtime state of the engine for one llama_context (counters and the RNG of
// the random policy). Owned by the context; the configuration is in cparams.
struct llama_kv_score_state {
    int64_t n_evictions     = 0;
    int64_t n_cells_evicted = 0;
    int64_t t_evict_us      = 0;
    int64_t n_compactions   = 0;
    int64_t t_compact_us    = 0;
    int64_t n_move_events   = 0; // graphs that moved rows of single layers/heads
    int64_t n_bytes_moved   = 0; // K + V bytes they moved
    int64_t t_move_us       = 0;
    int64_t n_lazy_flushes  = 0; // batched products that scored pending queries
    int64_t n_lazy_queries  = 0; // queries they covered (decode steps and prefill tokens)
    int64_t t_lazy_us       = 0;
    int64_t n_host_moves    = 0; // move events done as host copies (llama-kv-move.cpp)

    std::mt19937 rng{0};
};

// Lazy scoring (llama-kv-lazy.cpp). With flash attention the graph never holds the
// attention probabilities, so eager scoring runs one more K.q and softmax per step:
// one more pass over K per token, and in prefill one more KQ product per ubatch.
// Between the events that change cells (eviction, compaction, llama_memory_seq_*,
// state save/load) no cell is removed, so a query's attention row can still be
// computed later: a lazy ubatch only stores its post-RoPE Q in a ring (one per scored
// layer, on the layer's backend), and one batched product per stream scores the
// ring's queries when the scores are needed. K is read once per flush, not per token.
//
// Two ring shapes:
// - a window (alpha < 1, when its queries fit): a query followed by k later ones
//   weighs alpha^k, below the bounded-scoring tolerance once k >= rows_that_count, so
//   the ring keeps only the last queries, never needs a flush to make room, and also
//   takes prefill ubatches: a prompt of many ubatches is scored once, over its last
//   rows that count, instead of once per ubatch;
// - a buffer of N_SLOTS_BUFFER decode queries (alpha = 1: every query keeps its
//   weight), flushed when full.
struct llama_kv_lazy {
    static constexpr uint32_t N_SLOTS_BUFFER = 64;  // queries a buffer ring holds per stream
    static constexpr uint32_t N_SLOTS_WINDOW = 512; // the largest window ring

    llama_context * owner = nullptr; // the context whose scheduler flushes (set on each decode)
    bool step_lazy = false;          // the ubatch being built/computed stores its queries
    bool no_memory = false;          // the rings could not be allocated: every step is scored eagerly

    uint32_t n_slots = 0;            // queries a ring holds per stream (chosen by before_ubatch)
    bool     window  = false;        // the rings are windows (see above)

    // F32 [head_dim, n_slots, n_head, n_stream] per scored layer (same order as kv.layers with scores)
    std::vector<ggml_tensor *>         rings;
    std::vector<ggml_context_ptr>      ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;

    // per stream: the ring's sequence, the positions of its queries since the last flush
    // (query t is in slot t % n_slots; at most one per cell, as no cell is freed between
    // flushes), the cells written since the last flush
    std::vector<int32_t>               seq;
    std::vector<std::vector<int32_t>>  pos;
    std::vector<std::vector<uint32_t>> written;

    std::vector<float> kq_scale; // per scored layer, as the attention graph applied it

    bool pending() const {
        for (const auto & p : pos) {
            if (!p.empty()) {
                return true;
            }
        }
        return false;
    }
};

// What each (scored layer, KV head) -- a "unit" -- holds in each cell. llama.cpp's
// cells carry one position for all layers and heads; granularity LAYER / HEAD moves
// a unit's kept tokens between cells (llama-kv-evict.cpp), after which a cell's K/V
// rows of different units belong to different tokens. This map is the truth then:
// protection, ranking, kv_scores(), the visualiser and the state read it. It also
// counts, per unit and cell, when the token was written (mean attention divides by
// the queries that saw it). Kept in the cache (patch 0008) so that the graph inputs,
// which see only the cache, can record every write. Empty until a policy needs it.
struct llama_kv_units {
    uint32_t n_layer   = 0; // scored layers
    uint32_t n_head_kv = 0; // KV heads per layer (the largest)
    uint32_t kv_size   = 0; // 0: not allocated
    uint32_t n_stream  = 0;

    std::vector<int32_t> pos;      // [n_stream][n_layer*n_head_kv][kv_size]: position of the unit's token
    std::vector<int64_t> born;     // same shape: the sequence's query count when the token was written
    std::vector<uint8_t> diverged; // [n_stream]: some unit holds another token than its cell's own

    std::map<int32_t, int64_t> n_queries; // queries evaluated per sequence so far

    // not part of the map: the decode queries not yet scored, kept here because this
    // member is the engine's one foothold in the cache (resetting the map keeps it)
    llama_kv_lazy lazy;

    bool     allocated() const { return kv_size != 0; }
    uint32_t n_units()   const { return n_layer*n_head_kv; }
    size_t   at(uint32_t strm, uint32_t unit, uint32_t cell) const {
        return ((size_t) strm*n_units() + unit)*kv_size + cell;
    }
};

// The one friend of llama_context, llama_kv_cache and llama_kv_cache_context:
// the hooks reach llama.cpp's private state through it, so the patches stay
// one-liners and llama.cpp's classes keep their shape.
struct llama_kv_score_access {
    // llama_kv_cache constructor: allocate the score (and value-norm) tensors of the
    // layer just created, in the same context (buffer type) as its K and V
    static void alloc_layer(llama_kv_cache & kv, ggml_context * ctx, uint32_t il, uint32_t kv_size, uint32_t n_stream);

    // llm_graph_context::build_attn (KV cache variant), right after V is stored:
    // store the L1 norms of the new V rows per KV head (value-aware scoring only)
    static void build_store_vnorm(const llm_graph_context & g, const llama_kv_cache_context * mctx,
                                  ggml_tensor * v_cur, ggml_tensor * k_idxs, int il);

    // llm_graph_context::build_attn_mha, with flash attention on: true when layer il of this
    // ubatch must score every query row (alpha = 1, or a short ubatch scored eagerly), so the
    // unfused path materialises the probabilities once instead of the fused kernel plus a
    // second K*Q product and softmax for the scores (decode and lazily scored steps: false)
    static bool attn_unfused(const llm_graph_context & g, int il);
    // every scored layer's K is in host memory (the CPU backend computes its attention)
    static bool scores_on_host(const llama_kv_cache & kv);
    // llama.cpp's unfused attention copies V transposed, which a quantized V (flash attention
    // only) cannot be: its output is garbage (NaN), so such caches keep the fused kernel
    static bool v_transposable(const llama_kv_cache & kv);
    // decode_scoring "auto" on a host cache: decode steps are not deferred (before_ubatch)
    static bool eager_host_decode(const llama_kv_policy_cfg & cfg, const llama_kv_cache & kv);
    // ... and take the unfused attention where this CPU runs it faster (attn_unfused)
    static bool unfused_host_decode(const llama_kv_policy_cfg & cfg, const llama_kv_cache & kv);
    // ggml's CPU backend runs AVX-512 kernels on an Intel CPU, where its unfused attention
    // for one query beats its flash-attention kernel (measured; decided once per process)
    static bool cpu_unfused_decode_faster();

    // llm_graph_context::build_attn (KV cache variant), after attention:
    // S <- alpha^n * S + sum_q alpha^(n-1-q) * sum_heads P[q, head, cell]
    static void build_update(const llm_graph_context & g, const llm_graph_input_attn_kv * inp,
                             ggml_tensor * q_cur, ggml_tensor * k, ggml_tensor * kq_mask,
                             float kq_scale, ggml_tensor * attn_out, int il);
    // the same for llm_graph_context::build_attn (iSWA variant, global layers only):
    // mctx is the base cache's context of the llama_kv_cache_iswa_context
    static void build_update(const llm_graph_context & g, const llama_kv_cache_context * mctx,
                             ggml_tensor * q_cur, ggml_tensor * k, ggml_tensor * kq_mask,
                             float kq_scale, ggml_tensor * attn_out, int il);

    // llama_context::decode, when a batch found no slot: evict by the policy so that
    // the batch fits. Returns the number of cells freed, 0 if there is nothing to do
    // (no policy), or -1 if the batch cannot fit even after eviction (cache untouched).
    static int32_t evict_for_batch(llama_context & lctx, const llama_batch_allocr & balloc);

    // fill the host inputs of the scoring ops for the current ubatch:
    // w [n_tokens/n_stream, 1, 1, n_stream] query weights, m [n_kv, n_stream] cell decays
    // and, when the policy tracks units, record the cells the ubatch writes
    static void set_score_inputs(const llama_kv_cache_context * mctx, const struct llama_ubatch * ubatch,
                                 const llama_kv_policy_cfg & cfg, ggml_tensor * w, ggml_tensor * m);

    // extra graph nodes per model layer that the scoring ops need
    static uint32_t graph_nodes_per_layer();

    // llama_kv_cache::update, after a cross-stream seq_cp copied the K/V of stream
    // ssrc into sdst: copy the score and value-norm rows of every layer the same way
    static void copy_stream(llama_kv_cache & kv, uint32_t ssrc, uint32_t sdst);

    // granularity: the unit map of a cache, allocated (from the cells' own positions)
    // when a policy first needs it (llama-kv-units.cpp)
    static llama_kv_units & units(const llama_kv_cache & kv, bool allocate);
    static void             reset_units(const llama_kv_cache & kv);
    static void             record_writes(const llama_kv_cache & kv, uint32_t s0,
                                          const std::vector<std::vector<uint32_t>> & idxs, const llama_ubatch & ub);
    static void             copy_stream_units(const llama_kv_cache & kv, uint32_t ssrc, uint32_t sdst);

    // move (layer, head) rows of K, V, score and value norm between cells of one stream,
    // as one graph on the cache's backend (llama-kv-move.cpp). moves[u] lists the
    // (src, dst) cells of unit u = layer*n_head_kv + head.
    static bool move_unit_rows(llama_context & lctx, llama_kv_cache & kv, uint32_t strm,
                               const std::vector<std::vector<std::pair<uint32_t, uint32_t>>> & moves);
    // whether move_unit_rows copies in host memory instead of computing a graph
    static bool moves_on_host(const llama_kv_cache & kv);

    // re-rotate K of single (layer, head) units: deltas[u][cell] is the change of position of
    // the token unit u holds in that cell of stream strm (llama-kv-move.cpp)
    static bool rotate_unit_rows(llama_context & lctx, llama_kv_cache & kv, uint32_t strm,
                                 const std::vector<std::vector<int32_t>> & deltas);
    // the sliding-window cache's cells of one sequence, and the positions inside its window
    // (the ones a next query can still see: llama.cpp drops the others lazily)
    struct swa_seq_cells {
        llama_kv_cells * cells = nullptr;
        std::vector<std::pair<int32_t, uint32_t>> all; // (position, cell), ascending
        std::vector<int32_t> window;                   // ascending
        int32_t pos_max = -1;
    };
    static swa_seq_cells gather_swa(llama_kv_cache & swa, int32_t seq_id);
    // compaction of a stream whose units hold different tokens per cell (llama-kv-compact.cpp);
    // swa: the sliding-window cache beside it (iSWA memory), renumbered in step, or nullptr
    static int32_t compact_units(llama_context & lctx, llama_kv_cache & kv, uint32_t strm, int32_t seq_id,
                                 llama_kv_cache * swa);

    // lazy decode scoring (llama-kv-lazy.cpp).
    // llama_context::decode, before each ubatch's graph: decide whether this ubatch only
    // stores its queries (flash attention, one token per stream, room in the ring); if not,
    // score the pending ones first
    static void before_ubatch(llama_context & lctx, const llama_ubatch & ubatch, const llama_memory_context_i * mctx);
    // llama_kv_cache::seq_*: the cells of seq_id (-1: any) at positions [p0, p1) (negative:
    // unbounded) are about to change; if any exists in a stream with pending queries, score
    // them first
    static void before_cells_change(const llama_kv_cache & kv, int32_t seq_id, int32_t p0, int32_t p1);
    // llama_kv_cache::clear: the pending queries go with the cells
    static void drop_pending_queries(const llama_kv_cache & kv);
    // score the pending queries of every stream now (every reader of scores calls it)
    static bool flush_lazy(llama_context & lctx, llama_kv_cache & kv);
    // graph side of a lazy step: store this layer's queries in its ring
    // (false: no memory for the rings, the caller scores this step eagerly)
    static bool build_store_queries(const llm_graph_context & g, const llama_kv_cache_context * mctx,
                                    ggml_tensor * q_cur, float kq_scale, int il);
    // fill the ring rows of a lazy ubatch and record its queries (seq, position, cell written)
    static void set_lazy_inputs(const llama_kv_cache_context * mctx, const struct llama_ubatch * ubatch,
                                const llama_kv_policy_cfg & cfg, ggml_tensor * rows);
    // whether the ubatch being built is a lazy step (graph reuse compares it)
    static bool lazy_step(const llama_kv_cache_context * mctx);
    // whether a lazy graph built for n_store stored tokens and rings of n_slots serves this ubatch
    static bool lazy_graph_reusable(const llama_kv_cache_context * mctx, uint32_t n_tokens, int64_t n_store, int64_t n_slots);
    // the rings' shape for this policy and cache: n_slots per stream, window or buffer (llama_kv_lazy)
    static void lazy_ring_shape(const llama_kv_policy_cfg & cfg, const llama_kv_cache & kv,
                                const std::vector<int32_t> & ids, uint32_t & n_slots, bool & window);
    // one small graph on the context's scheduler (llama-kv-move.cpp)
    static bool compute_side_graph(llama_context & lctx, const char * what,
                                   const std::function<void(ggml_context *, ggml_cgraph *, llm_graph_input_side &)> & build);
    // the score update shared by the eager graph and the flush: decay, weight, add
    static void build_score_add(ggml_context * ctx0, ggml_cgraph * gf, const llama_kv_cache & kv, int il,
                                ggml_tensor * probs, ggml_tensor * w, ggml_tensor * m, uint32_t s0, bool value_aware);

    static int32_t head_scores(llama_context & lctx, int32_t seq_id, int32_t capacity,
                               int32_t * pos_out, float * scores_out);
    static int32_t compress_seq(llama_context & lctx, int32_t seq_id, int32_t n_keep);
    static int32_t n_head_kv(const llama_kv_cache & kv);
    static bool    uses_alibi(const llama_context & lctx);

    // helpers of the C API (llama-kv-policy.cpp)
    // the cache the engine scores and evicts in: the context's llama_kv_cache, or the
    // base (global-layer) cache of a llama_kv_cache_iswa; nullptr for other memory
    static llama_kv_cache        * get_kv(const llama_context & lctx);
    // the sliding-window cache of a llama_kv_cache_iswa (nullptr otherwise): it keeps
    // its own window, with no scores; eviction and compaction keep it consistent
    static llama_kv_cache        * get_swa(const llama_context & lctx);
    // the base cache's context of a batch's memory context (plain or iSWA)
    static const llama_kv_cache_context * base_context(const llama_memory_context_i * mctx);
    static bool                    is_swa_cache(const llama_kv_cache & kv);
    static llama_kv_policy_cfg   & cfg(llama_context & lctx);
    static llama_kv_score_state  & state(llama_context & lctx);
    static void                    invalidate_graphs(llama_context & lctx);
    static std::vector<ggml_tensor *> scored_layers(const llama_kv_cache & kv);
    // every scored layer's per-head row of K and V is whole blocks of its type (always for
    // F16/F32/BF16; Q8_0 etc. when head_dim is a multiple of 32), so a head's row moves alone
    static bool unit_rows_whole_blocks(const llama_kv_cache & kv);
    // a layer's K is quantized but stored without llama.cpp's Hadamard rotation, which its
    // K-shift of a quantized K needs (llama-kv-compact.cpp)
    static bool quantized_k_unrotated(const llama_kv_cache & kv);
    static int32_t                 n_scored_layers(const llama_kv_cache & kv);
    static std::vector<int32_t>    scored_layer_ids(const llama_kv_cache & kv); // model layer indices
    static int32_t                 n_cells(const llama_kv_cache & kv, int32_t seq_id);
    static int64_t                 n_cells_used(const llama_kv_cache & kv);
    static int32_t                 read_scores(llama_context & lctx, int32_t seq_id, int32_t capacity,
                                               int32_t * pos_out, int32_t * cell_out, float * scores_out);
    static int32_t                 evict_seq(llama_context & lctx, int32_t seq_id, int32_t n_free);
    static int32_t                 evict_seq_impl(llama_context & lctx, llama_kv_cache & kv, const llama_kv_policy_cfg & cfg,
                                                  llama_kv_score_state & st, uint32_t strm, int32_t seq_id, int32_t n_free);
    static int32_t                 compact_seq(llama_context & lctx, int32_t seq_id); // llama-kv-compact.cpp
    // why compact_seq cannot run on seq_id (0: it can): its checks, which change nothing
    static int32_t                 compact_error(const llama_context & lctx, int32_t seq_id);
    static bool                    valid_seq(const llama_kv_cache & kv, int32_t seq_id);
    // (position, cell) of the cells of seq_id, ordered by position (llama-kv-evict.cpp)
    static std::vector<std::pair<int32_t, uint32_t>> cells_by_pos(const llama_kv_cells & cells, int32_t seq_id);
    // the checks and cells every reader of a sequence starts with: 0 or an error code
    static int32_t cells_for_read(llama_context & lctx, int32_t seq_id, int32_t capacity, llama_kv_cache *& kv,
                                  uint32_t & strm, std::vector<std::pair<int32_t, uint32_t>> & order);
};
