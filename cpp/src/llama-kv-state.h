// a2sf: the eviction engine's part of llama.cpp's state (save/load, session and
// sequence state): scores and value norms travel with their cells, and a checksum
// over the whole a2sf-framed state refuses a damaged one. docs/STATE.md describes it.
//
// Layout added to llama.cpp's state stream (all little-endian, native sizes), version 3:
//
//   llama_context::state_*_write_data, through llama_kv_state_writer:
//     header   u32 magic 'A2SF', u32 version, u32 flags (scored, value-aware),
//              u32 n_layer (KV layers with score rows; 0 without a plain KV cache),
//              i32 seq_id (the saved sequence, -1: the whole context)
//     ...      llama.cpp's memory module; per stream, right after its K/V rows:
//     cells    u32 magic 'A2SC', u32 n_layer, u32 n_cells (the stream's cell count), then per layer:
//              u32 n_head_kv, f32 score[n_head_kv][n_cells], f32 vnorm[n_cells][n_head_kv];
//              then u32 n_units (0: no layer/head map), and if n_units > 0:
//              u32 diverged, per unit { i32 pos[n_cells], i64 born[n_cells] },
//              u32 n_seq, { i64 seq_id, i64 n_queries } per sequence (a sequence state: its own)
//     trailer  u32 has_rng, then (whole context only) the random policy's RNG as text
//              (u32 length, bytes), then u64 checksum (llama_kv_state_hash) of every byte
//              from the header's magic to the end of the RNG text, preceded by the token
//              list where llama.cpp's *_save_file writes one before the state
//
// Version 2 (no seq_id, no n_cells, no checksum) is still read, without the checksum.
//
// The reader checks every count against its own context before touching the cache
// (header) or while restoring it (cells: counts, positions, the unit map, scores), and
// the checksum at the end; a refused state leaves the restored context (or sequence)
// empty: llama_state_set_data and the sequence functions return 0, and
// llama_kv_policy_state_error() says why.
#pragma once

#include "llama.h"
#include "llama-io.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

struct llama_context;
class  llama_kv_cache;

// A 64-bit hash of a byte stream, written for this file (docs/STATE.md): four lanes of
// 8-byte words, each step a bijection of the lane, so changing any one word always
// changes the result; the value does not depend on how the stream is split into calls.
struct llama_kv_state_hash {
    void     update(const void * data, size_t size);
    uint64_t digest() const;

private:
    void block(const uint8_t * p);

    uint64_t lane[4] = {
        0x9e3779b97f4a7c15ull, 0x3c6ef372fe94f82aull, 0xdaa66d2c7ddf743full, 0x78dde6e5fd29f054ull,
    };
    uint8_t  buf[32] = {};
    uint32_t n_buf   = 0;
    uint64_t n_total = 0;
};

// llama_context::state_*_write_data: the io the memory module writes through. The
// constructor writes the a2sf header, end() the trailer and the checksum of all between.
class llama_kv_state_writer : public llama_io_write_i {
public:
    llama_kv_state_writer(llama_context & lctx, llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags);

    void   write(const void * src, size_t size) override;
    void   write_tensor(ggml_tensor * tensor, size_t offset, size_t size) override;
    size_t n_bytes() override { return io.n_bytes(); }

    void end();

    llama_seq_id saved_seq() const { return seq_id; }

private:
    llama_context    & lctx;
    llama_io_write_i & io;
    llama_seq_id       seq_id;
    bool               hashing; // off for a size-only pass and for device-side sequence states

    llama_kv_state_hash  hash;
    std::vector<uint8_t> scratch;
};

// llama_context::state_*_read_data: begin() checks the a2sf header, guard() runs the
// memory module's restore (and keeps why it refused), end() reads the trailer and checks
// the checksum. Any refusal after begin() empties what the restore wrote.
class llama_kv_state_reader : public llama_io_read_i {
public:
    llama_kv_state_reader(llama_context & lctx, llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags);

    void   read(void * dst, size_t size) override;
    void   read_tensor(ggml_tensor * tensor, size_t offset, size_t size) override;
    void   discard() override { io.discard(); }
    size_t n_bytes() override { return io.n_bytes(); }

    void begin();                   // throws on a header that does not fit this context
    template <typename F>
    void guard(F && restore) {      // throws what restore threw, after emptying
        try {
            restore();
        } catch (const std::exception & e) {
            refused(e.what());
            throw;
        }
    }
    void end();                     // throws on a malformed trailer or a checksum mismatch

    // what read_cells needs to know about the stream it reads
    uint32_t     version()   const { return ver; }
    llama_seq_id dest_seq()  const { return seq_id; }
    llama_seq_id saved_seq() const { return src_seq; }
    bool         host_data() const { return !on_device; }

private:
    void read_header();
    void refused(const char * what); // empty the destination, keep the first reason

    llama_context   & lctx;
    llama_io_read_i & io;
    llama_seq_id      seq_id;
    bool              on_device;
    bool              hashing = false;
    uint32_t          ver     = 0;
    llama_seq_id      src_seq = -1;

    llama_kv_state_hash  hash;
    std::vector<uint8_t> scratch;
};

struct llama_kv_state_access {
    // llama_kv_cache: the score and value-norm rows (and unit map) of the cells just written/read
    static void write_cells(const llama_kv_cache & kv, llama_io_write_i & io, uint32_t strm,
                            const std::vector<std::pair<uint32_t, uint32_t>> & ranges);
    static bool read_cells(llama_kv_cache & kv, llama_io_read_i & io, uint32_t strm,
                           const std::vector<uint32_t> & idxs);

    // llama_context::state_get_size / state_seq_get_size: a pass that only counts bytes
    // (nothing to hash) is in progress on this thread while one of these lives
    struct size_pass {
        size_pass();
        ~size_pass();
    };

    // llama_context::state_*_save_file / load_file: the token list written before the
    // state; the next writer/reader on this thread hashes it first
    static void file_tokens(const llama_token * tokens, size_t n_tokens);

    // llama_io_read_i::read_string: a length field never allocates more than the
    // stream still holds (read in bounded chunks)
    static void read_string(llama_io_read_i & io, std::string & str);

    // the reason the last failed restore on this thread failed ("" if none)
    static const char * last_error();
};
