// a2sf: attention-score KV-cache eviction for llama.cpp.
//
// Additions to llama.cpp's C API. Nothing here changes an existing llama.cpp
// struct or signature: these are new functions that llama-cpp-python's ctypes
// bindings never see, so they keep working against the patched libllama.
#pragma once

#include "llama.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// How the eviction engine ranks the cells of a sequence when the cache is full.
enum llama_kv_policy_kind {
    LLAMA_KV_POLICY_NONE      = 0, // vanilla llama.cpp: no scores, no eviction
    LLAMA_KV_POLICY_STREAMING = 1, // StreamingLLM: keep sinks + newest, no scores
    LLAMA_KV_POLICY_SCORE     = 2, // accumulated attention with forgetting factor (H2O, TOVA, A2SF, VATP)
    LLAMA_KV_POLICY_RANDOM    = 3, // random eviction among unprotected cells (evaluation baseline)
};

// Which unit keeps its own tokens when a score-ranked policy evicts. Eviction always
// frees whole cells; with LAYER / HEAD each unit picks its own victims, one common set
// of cells is freed, and each unit's kept tokens in that set move into its own holes
// (per-head rows of K and V, and their scores), so every unit still occupies the same
// cells and llama.cpp's single KQ mask stays valid.
enum llama_kv_granularity {
    LLAMA_KV_GRANULARITY_AUTO  = -1, // HEAD, or TOKEN where HEAD cannot run (ALiBi; quantized K, which
                                     // per-head compaction cannot re-rotate): llama_kv_policy_set resolves it
    LLAMA_KV_GRANULARITY_TOKEN = 0, // a cell is one token for all layers and heads: rank by the score summed over them
    LLAMA_KV_GRANULARITY_LAYER = 1, // each layer keeps its own tokens (score summed over the layer's KV heads)
    LLAMA_KV_GRANULARITY_HEAD  = 2, // each (layer, KV head) keeps its own tokens
};

// n_recent: the recent window is half of what each eviction keeps
#define LLAMA_KV_RECENT_HALF (-1)

// How queries are scored when flash attention is on (it never materialises the
// attention probabilities). All are exact. A ubatch scored in its own graph whose every
// query row counts runs the layer's attention unfused (on a device cache: from 16 tokens
// per stream), so the probabilities are computed once; otherwise it adds a K.q and
// softmax over the rows that count.
enum llama_kv_decode_scoring {
    LLAMA_KV_DECODE_SCORING_EAGER = 0, // every ubatch is scored in its own graph
    LLAMA_KV_DECODE_SCORING_LAZY  = 1, // decode steps (and for alpha < 1 prefill ubatches) store Q; one
                                       // batched product scores them when the scores are needed
                                       // (eviction, reads, state, memory ops)
    LLAMA_KV_DECODE_SCORING_AUTO  = 2, // lazy, but a decode step of a cache in host memory is scored
                                       // in its own graph, with the unfused attention where ggml's
                                       // CPU backend runs AVX-512 kernels (faster there than its
                                       // flash-attention kernel for one query), else as eager
};

// decode_scoring "auto" scores a decode step of a host cache with llama.cpp's unfused
// attention on this CPU (true) or with the flash-attention kernel plus a K*q product (false)
LLAMA_API bool llama_kv_policy_auto_decode_unfused(void);

// the largest pool_kernel llama_kv_policy_set accepts
#define LLAMA_KV_POOL_KERNEL_MAX 256

// The policy of a context: its kind, then one field per row of llama-kv-policy-settings.def,
// in the rows' order (forgetting_factor, value_aware, n_sink, n_recent, ...): that table
// gives each field's type, range, default and meaning.
struct llama_kv_policy_params {
    int32_t kind; // enum llama_kv_policy_kind
#define LLAMA_KV_SETTING(name, ctype, ...) ctype name;
#include "llama-kv-policy-settings.def"
#undef LLAMA_KV_SETTING
};

struct llama_kv_policy_stats {
    int64_t n_evictions;      // eviction events
    int64_t n_cells_evicted;  // cells freed by eviction (summed over sequences)
    int64_t n_cells_used;     // cells in use now
    int64_t t_evict_us;       // time spent in eviction (reading scores, choosing, freeing)
    int64_t n_compactions;    // llama_kv_policy_compact calls that moved a position
    int64_t t_compact_us;     // time spent in them (renumbering + the K-shift graph)
    int64_t n_move_events;    // granularity LAYER/HEAD and compression: graphs that moved K/V rows
    int64_t n_bytes_moved;    // K + V bytes they moved
    int64_t t_move_us;        // time spent in them (included in t_evict_us when eviction moved)
    int64_t n_lazy_flushes;   // lazy scoring: batched products that scored pending queries
    int64_t n_lazy_queries;   // queries they covered (decode steps and prefill tokens, per stream)
    int64_t t_lazy_us;        // time spent in them
    int64_t n_host_moves;     // of n_move_events: copies in host memory (a CPU cache) instead of a graph
};

// error codes returned by the functions below (0 = success)
#define LLAMA_KV_POLICY_ERR_ARG      (-1) // an argument is out of range
#define LLAMA_KV_POLICY_ERR_MEMORY   (-2) // the context has no plain KV cache (recurrent, iSWA, ...)
#define LLAMA_KV_POLICY_ERR_SEQ      (-3) // sequence id out of range
#define LLAMA_KV_POLICY_ERR_CAPACITY (-4) // output buffer too small
#define LLAMA_KV_POLICY_ERR_SHIFT    (-5) // the model's positions cannot be shifted (learned positions, M-RoPE)
#define LLAMA_KV_POLICY_ERR_SHARED   (-6) // a cell that would move is shared with another sequence
#define LLAMA_KV_POLICY_ERR_STATE    (-7) // not possible in the cache's current state (see the function)

LLAMA_API struct llama_kv_policy_params llama_kv_policy_default_params(void);

// --- the settings table (llama-kv-policy-settings.def) at run time -------------------

enum llama_kv_setting_type {
    LLAMA_KV_SETTING_INT   = 0, // an integer in [min, max]
    LLAMA_KV_SETTING_FLOAT = 1, // a finite real number in [min, max]
    LLAMA_KV_SETTING_BOOL  = 2, // 0 or 1
    LLAMA_KV_SETTING_ENUM  = 3, // one of the numbers min..max, named by choices
};

// One row of the table.
struct llama_kv_policy_setting {
    const char * name;          // the field of llama_kv_policy_params
    int32_t      type;          // enum llama_kv_setting_type
    double       min, max;      // inclusive range (ENUM: the numbers of the first and last choice)
    bool         has_auto;      // auto_value (outside [min, max]) means "the engine chooses"
    double       auto_value;
    double       default_value; // what llama_kv_policy_default_params() holds
    const char * choices;       // ENUM: the names of min..max, '|'-separated; "" otherwise
    const char * help;
};

// The number of rows, and row i (NULL when i is out of range): static storage, never freed.
LLAMA_API int32_t llama_kv_policy_n_settings(void);
LLAMA_API const struct llama_kv_policy_setting * llama_kv_policy_setting_info(int32_t i);
// The row of the field called name, or LLAMA_KV_POLICY_ERR_ARG when there is none.
LLAMA_API int32_t llama_kv_policy_setting_index(const char * name);

// Field i of params, as a double (NAN when i is out of range).
LLAMA_API double llama_kv_policy_get_value(const struct llama_kv_policy_params * params, int32_t i);

// Check value for field i and store it in params: 0, or LLAMA_KV_POLICY_ERR_ARG (params
// unchanged) with a one-line message in msg (may be NULL; truncated to msg_size), e.g.
// "n_sink must be in [0, 2^31-1], got -1". value is a double so that a caller may pass
// what it read (a Python int, a flag's text) before it fits the field's C type.
LLAMA_API int32_t llama_kv_policy_set_value(struct llama_kv_policy_params * params, int32_t i, double value,
                                            char * msg, size_t msg_size);

// Check every field of params (the kind, then each row) as llama_kv_policy_set does:
// 0, or LLAMA_KV_POLICY_ERR_ARG with the message of the first bad field in msg.
// (llama_kv_policy_set also refuses what the context cannot run: see there.)
LLAMA_API int32_t llama_kv_policy_check(const struct llama_kv_policy_params * params, char * msg, size_t msg_size);

// Set (or replace) the policy of a context. Invalidates graph reuse.
// Returns 0, or a negative LLAMA_KV_POLICY_ERR_* code (nothing is changed then).
LLAMA_API int32_t llama_kv_policy_set(struct llama_context * ctx, const struct llama_kv_policy_params * params);
LLAMA_API int32_t llama_kv_policy_get(const struct llama_context * ctx, struct llama_kv_policy_params * out);

// Number of KV-cache layers that carry scores (0 if the context has no plain KV cache).
// With iSWA memory (Gemma 2/3: sliding-window layers in a cache of their own) these are
// the global layers, the ones in llama.cpp's base cache.
LLAMA_API int32_t llama_kv_policy_n_layers(const struct llama_context * ctx);

// The model layer index of each scored layer, in the order of the score rows of
// llama_kv_policy_scores: writes min(n, capacity) ids, returns n (the n_layers count).
LLAMA_API int32_t llama_kv_policy_scored_layer_ids(const struct llama_context * ctx, int32_t capacity, int32_t * ids_out);

// Number of cells currently holding seq_id (or a negative error code).
LLAMA_API int32_t llama_kv_policy_n_cells(const struct llama_context * ctx, llama_seq_id seq_id);

// Copy out, for each cell holding seq_id (ordered by position), its position, its
// cell index, and its score in every scored layer (scores laid out [n_layers][n_cells]).
// capacity is the number of cells the buffers hold. Any pointer may be NULL.
// Returns the number of cells written, or a negative error code.
LLAMA_API int32_t llama_kv_policy_scores(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        int32_t                capacity,
        llama_pos            * pos_out,
        int32_t              * cell_out,
        float                * scores_out);

LLAMA_API int32_t llama_kv_policy_get_stats(const struct llama_context * ctx, struct llama_kv_policy_stats * out);
LLAMA_API void    llama_kv_policy_reset_stats(struct llama_context * ctx);

// Number of KV heads of the scored layers (the largest, if they differ).
LLAMA_API int32_t llama_kv_policy_n_head_kv(const struct llama_context * ctx);

// Per (scored layer, KV head): the position of the token each holds in each cell of seq_id
// (cells ordered as llama_kv_policy_scores orders them) and its score, laid out
// [n_layers][n_head_kv][n_cells]. With granularity TOKEN every head of a cell holds the
// cell's token; LAYER / HEAD move tokens between cells. Returns the number of cells, or
// a negative error code. Any pointer may be NULL.
LLAMA_API int32_t llama_kv_policy_head_scores(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        int32_t                capacity,
        llama_pos            * pos_out,
        float                * scores_out);

// Prompt compression: evict seq_id down to n_keep cells by the policy's ranking (its
// granularity), then move the kept cells to the front of the cache (cells [0, n) of the
// stream, order kept) so that decoding attends over n cells, not the whole prompt.
// Returns the number of cells the sequence holds, or a negative error code (ERR_STATE:
// other sequences hold cells of the same stream, which the move would have to respect).
LLAMA_API int32_t llama_kv_policy_compress(struct llama_context * ctx, llama_seq_id seq_id, int32_t n_keep);

// Evict now, as decode does when the cache is full: free n_free cells (plus nothing
// more) from seq_id by the policy's ranking. Returns the number of cells freed, or
// a negative error code. Mainly for tests and tools.
LLAMA_API int32_t llama_kv_policy_evict(struct llama_context * ctx, llama_seq_id seq_id, int32_t n_free);

// Why the last failed state restore on the calling thread failed (llama_state_set_data,
// llama_state_seq_set_data, llama_state_load_file, ... returned 0/false because the
// a2sf part of the state did not match this context), or "" if the last restore on
// this thread succeeded or failed for a reason of llama.cpp's own (see its log).
// The state carries each cell's scores and value norms, so a restored context
// evicts exactly as the one that saved it; a state saved under a different kind of
// policy (scored vs not, value-aware vs not) or another model is refused.
LLAMA_API const char * llama_kv_policy_state_error(void);

// The 64-bit hash a2sf's state checksum uses (version 3 of its state section; see
// docs/STATE.md), of size bytes at data: for tools and tests that check or measure it.
LLAMA_API uint64_t llama_kv_policy_state_hash(const void * data, size_t size);

// Position compaction: renumber the cells of seq_id to positions 0..n-1 in position
// order (sinks first) and re-rotate each cell's K by its change of position (llama.cpp's
// K-shift, applied before returning). Scores, value norms and cells stay as they are.
// Returns n, the position the next token of seq_id must take, or a negative error code
// (ERR_SHIFT for models without RoPE; ERR_SHARED when a cell that would move also holds
// another sequence: nothing is changed then).
// iSWA memory (Gemma 2/3): the global-layer cache is renumbered so; the sliding-window
// cache's cells of seq_id move by one delta, its newest onto the last renumbered
// position (distances inside the window are kept exactly). If the window holds more
// tokens m than the global cache's n, the positions are m-n..m-1 and m is returned.
// Granularity LAYER/HEAD after moves (a cell holds different tokens per head): the
// positions any head holds become 0..m-1 (one numbering for every head; m >= n), each
// K row re-rotated by its own delta, and m is returned; the cells take the positions
// of their layer-0 head-0 token, so some positions below m hold no cell. Beside an
// iSWA window the positions inside the window join that numbering, so the window
// again moves by one delta.
LLAMA_API int32_t llama_kv_policy_compact(struct llama_context * ctx, llama_seq_id seq_id);

// --- when to compact: the "positions" setting of a2sf.Llama and llama-server --------
//
// A caller that compacts keeps two numberings per sequence: its token index and the cache
// position (what llama_kv_policy_compact renumbers). Both python/a2sf (a2sf.compaction)
// and llama-server (cpp/server/a2sf-server.cpp) ask these two functions.

// In the order of python/a2sf/compaction.py POSITION_MODES.
enum llama_kv_positions {
    LLAMA_KV_POSITIONS_CACHE    = 0, // positions stay below twice the sequence's cells (StreamingLLM
                                     // numbers positions within the cache): compact once eviction has
                                     // left holes and the next batch would reach that bound
    LLAMA_KV_POSITIONS_TRAINING = 1, // compact only before the next batch would pass the training context
    LLAMA_KV_POSITIONS_ABSOLUTE = 2, // never compact (llama.cpp's own positions)
};

// The positions mode for the policy in force on ctx when the user gives none: ABSOLUTE
// where llama_kv_policy_compact cannot run (learned positions, M-RoPE, a quantized K
// stored without its rotation, memory other than a plain or iSWA KV cache); TRAINING
// where the policy keeps tokens per layer or head (granularity LAYER/HEAD: over 32k-token
// streams it read 1.2% +- 0.5% better than CACHE, compacting 4 times instead of 126);
// else CACHE. Negative: an error code (ERR_ARG for a NULL ctx).
LLAMA_API int32_t llama_kv_policy_default_positions(const struct llama_context * ctx);

// What the caller remembers of a sequence's positions.
struct llama_kv_positions_state {
    int32_t mode;        // enum llama_kv_positions
    int64_t n_ctx_train; // the model's training context: no mode lets positions pass it (<= 0: no bound)
    int64_t n_cells;     // the sequence's cells (CACHE keeps positions below twice this)
    int64_t next_after;  // what the last llama_kv_policy_compact of the sequence returned (0: none since it began)
    int64_t n_unheld;    // positions below next_after that held no cell right after that compaction
                         // (iSWA window longer than the global cache; per-head cells)
};

// Whether to compact seq_id before evaluating n_new tokens from cache position next_pos on:
// 1 (compact first) or 0, or a negative error code. Never in ABSOLUTE. Otherwise when
// the sequence's newest cell is below next_pos - 1 (its newest tokens were evicted outside
// a decode: llama.cpp takes a batch only right after it); TRAINING: when next_pos + n_new
// would pass n_ctx_train; CACHE: when it would pass min(n_ctx_train, max(2 n_cells,
// next_after + n_cells)) and cells were evicted since the last compaction (cells held +
// n_unheld < next_pos), so that one compaction (which re-rotates every cell's K) serves
// about a cache's worth of tokens. (With per-head cells the positions any head holds can
// pass the cells held: compacting lowers them only past next_after.)
LLAMA_API int32_t llama_kv_policy_wants_compaction(const struct llama_context * ctx, llama_seq_id seq_id,
                                                   const struct llama_kv_positions_state * state,
                                                   llama_pos next_pos, int32_t n_new);

// Register the devices of the ggml RPC server at endpoint ("host:port", as llama-server's
// --rpc takes one; rpc-server / ggml-rpc-server on that host), so that a following model
// load with n_gpu_layers > 0 offloads layers to them, with their K/V and scores. The
// registration is process-wide and lasts until exit; an endpoint registered before adds
// nothing. Returns the server's number of devices, ERR_ARG for an empty endpoint or one
// with a comma, ERR_STATE when libllama was built without GGML_RPC. The server must be
// reachable: ggml's RPC client aborts when it cannot connect or the protocol differs
// (python/a2sf/_llama/rpc.py checks both first).
LLAMA_API int32_t llama_kv_policy_rpc_add_server(const char * endpoint);

#ifdef __cplusplus
}
#endif
