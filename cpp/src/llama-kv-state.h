// a2sf: the eviction engine's part of llama.cpp's state (save/load, session and
// sequence state): scores and value norms travel with their cells.
//
// Layout added to llama.cpp's state stream (all little-endian, native sizes):
//
//   llama_context::state_*_write_data:
//     header   u32 magic 'A2SF', u32 version, u32 flags (scored, value-aware),
//              u32 n_layer (KV layers with score rows; 0 without a plain KV cache)
//     ...      llama.cpp's memory module; per stream, right after its K/V rows:
//     cells    u32 magic 'A2SC', u32 n_layer, then per layer:
//              u32 n_head_kv, f32 score[n_head_kv][cell_count], f32 vnorm[cell_count][n_head_kv];
//              then u32 n_units (0: no layer/head map), and if n_units > 0:
//              u32 diverged, per unit { i32 pos[cell_count], i64 born[cell_count] },
//              u32 n_seq, { i64 seq_id, i64 n_queries } per sequence
//     trailer  u32 has_rng, then (whole context only) the random policy's RNG as text
//
// The reader checks every count against its own context before touching the
// cache (header) or while restoring it (cells), and refuses a state that would
// leave scores that do not belong to the cells: llama_state_set_data and the
// sequence functions return 0, and llama_kv_policy_state_error() says why.
#pragma once

#include "llama.h"

#include <cstdint>
#include <utility>
#include <vector>

struct llama_context;
class  llama_kv_cache;
class  llama_io_write_i;
class  llama_io_read_i;

struct llama_kv_state_access {
    // llama_context: around the memory module's state (seq_id -1 = whole context)
    static void write_begin(llama_context & lctx, llama_io_write_i & io, llama_seq_id seq_id);
    static void write_end  (llama_context & lctx, llama_io_write_i & io, llama_seq_id seq_id);
    static void read_begin (llama_context & lctx, llama_io_read_i  & io, llama_seq_id seq_id); // throws on mismatch
    static void read_end   (llama_context & lctx, llama_io_read_i  & io, llama_seq_id seq_id); // throws on mismatch

    // llama_kv_cache: the score and value-norm rows of the cells just written/read
    static void write_cells(const llama_kv_cache & kv, llama_io_write_i & io, uint32_t strm,
                            const std::vector<std::pair<uint32_t, uint32_t>> & ranges);
    static bool read_cells(llama_kv_cache & kv, llama_io_read_i & io, uint32_t strm,
                           const std::vector<uint32_t> & idxs);

    // the reason the last failed restore on this thread failed ("" if none)
    static const char * last_error();
};
