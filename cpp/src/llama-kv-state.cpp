// a2sf: scores and value norms in llama.cpp's state (see llama-kv-state.h for
// the layout, docs/STATE.md for what is checked). A restored context continues to
// evict exactly as the original: every cell gets back its per-layer score and value
// norms, and a whole-context restore also brings back the random policy's RNG.
//
// Nothing here may abort on bad input: a state from another context, another
// model, a libllama without a2sf, a truncated, inconsistent or damaged buffer is
// refused with an exception (llama.cpp turns it into a 0 return) and a message kept
// for llama_kv_policy_state_error(); what the refused restore wrote is emptied.

#include "llama-kv-state.h"
#include "llama-kv-score.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache.h"
#include "llama-kv-policy.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

namespace {

constexpr uint32_t STATE_MAGIC   = 0x46533241; // "A2SF"
constexpr uint32_t CELLS_MAGIC   = 0x43533241; // "A2SC"
constexpr uint32_t STATE_VERSION = 3; // 2: per-head scores, the (layer, head) unit map; 3: + checksum, seq id, cell count
constexpr uint32_t STATE_VERSION_OLDEST = 2;

constexpr uint32_t FLAG_SCORED      = 1u << 0; // scores were maintained (score-ranked policy)
constexpr uint32_t FLAG_VALUE_AWARE = 1u << 1; // value norms were maintained (VATP)

// the random policy's RNG as text is about 7 KB; anything far longer is not one
constexpr uint32_t MAX_RNG_TEXT = 1u << 16;
// llama_io_read_i::read_string reads at most this much per step
constexpr uint32_t STRING_CHUNK = 1u << 16;

// why the last restore on this thread failed; the Python layer reads it right
// after the failed call, on the same thread
thread_local std::string g_last_error;

// a size-only pass (llama_state_get_size ...) is running on this thread
thread_local int g_size_pass = 0;

// the token list of a *_save_file / *_load_file, hashed by the next writer/reader
thread_local const llama_token * g_file_tokens   = nullptr;
thread_local size_t              g_n_file_tokens = 0;
thread_local bool                g_has_file_tokens = false;

[[noreturn]] void fail(const char * fmt, ...) {
    char buf[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    g_last_error = buf;
    throw std::runtime_error(g_last_error);
}

bool refuse(const char * fmt, ...) {
    char buf[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    g_last_error = std::string("a2sf state: ") + buf;
    LLAMA_LOG_ERROR("%s: %s\n", __func__, g_last_error.c_str());
    return false;
}

uint32_t policy_flags(const llama_kv_policy_cfg & c) {
    uint32_t f = 0;
    if (c.scored()) {
        f |= FLAG_SCORED;
        if (c.params.value_aware) {
            f |= FLAG_VALUE_AWARE;
        }
    }
    return f;
}

const char * describe(uint32_t flags) {
    if (flags & FLAG_VALUE_AWARE) {
        return "a value-aware score policy (vatp)";
    }
    if (flags & FLAG_SCORED) {
        return "a score-ranked policy (h2o/tova/a2sf)";
    }
    return "no score-ranked policy (none/streaming/random)";
}

uint32_t n_state_layers(const llama_kv_cache * kv) {
    return kv ? (uint32_t) llama_kv_score_access::n_scored_layers(*kv) : 0;
}

// the file's token list, once, into the hash of the state that follows it
void take_file_tokens(llama_kv_state_hash & hash, bool use) {
    if (g_has_file_tokens && use) {
        const uint32_t n = (uint32_t) g_n_file_tokens;
        hash.update(&n, sizeof(n));
        if (n) {
            hash.update(g_file_tokens, (size_t) n*sizeof(llama_token));
        }
    }
    g_file_tokens     = nullptr;
    g_n_file_tokens   = 0;
    g_has_file_tokens = false;
}

// -- the hash -------------------------------------------------------------------
// Each lane takes every fourth 8-byte word: lane = mix(lane ^ word), mix an odd
// multiply and an xor-shift (both invertible), so for fixed other words the lane after
// a step is a bijection of each word. The digest folds the length and the four lanes
// through another invertible mix.

constexpr uint64_t M1 = 0xc2b2ae3d27d4eb4full;
constexpr uint64_t M2 = 0x94d049bb133111ebull;

inline uint64_t load64(const uint8_t * p) {
    uint64_t w;
    memcpy(&w, p, sizeof(w)); // little-endian hosts (llama.cpp's state is native-endian too)
    return w;
}

inline uint64_t step(uint64_t lane, uint64_t w) {
    uint64_t x = (lane ^ w)*M1;
    return x ^ (x >> 31);
}

inline uint64_t fold(uint64_t h) {
    h ^= h >> 33;
    h *= M2;
    h ^= h >> 29;
    h *= M1;
    h ^= h >> 32;
    return h;
}

} // namespace

void llama_kv_state_hash::block(const uint8_t * p) {
    lane[0] = step(lane[0], load64(p));
    lane[1] = step(lane[1], load64(p + 8));
    lane[2] = step(lane[2], load64(p + 16));
    lane[3] = step(lane[3], load64(p + 24));
}

void llama_kv_state_hash::update(const void * data, size_t size) {
    const uint8_t * p = (const uint8_t *) data;
    n_total += size;
    if (n_buf) {
        const size_t m = std::min<size_t>(size, sizeof(buf) - n_buf);
        memcpy(buf + n_buf, p, m);
        n_buf += (uint32_t) m;
        p     += m;
        size  -= m;
        if (n_buf < sizeof(buf)) {
            return;
        }
        block(buf);
        n_buf = 0;
    }
    uint64_t l0 = lane[0], l1 = lane[1], l2 = lane[2], l3 = lane[3];
    for (; size >= 32; p += 32, size -= 32) {
        l0 = step(l0, load64(p));
        l1 = step(l1, load64(p + 8));
        l2 = step(l2, load64(p + 16));
        l3 = step(l3, load64(p + 24));
    }
    lane[0] = l0; lane[1] = l1; lane[2] = l2; lane[3] = l3;
    if (size) {
        memcpy(buf, p, size);
        n_buf = (uint32_t) size;
    }
}

uint64_t llama_kv_state_hash::digest() const {
    uint64_t l[4] = { lane[0], lane[1], lane[2], lane[3] };
    // the tail: its whole words, then the last partial word zero-padded, lane by lane
    for (uint32_t i = 0; 8*i < n_buf; ++i) {
        uint8_t w[8] = {};
        memcpy(w, buf + 8*i, std::min<uint32_t>(8, n_buf - 8*i));
        l[i] = step(l[i], load64(w));
    }
    uint64_t h = fold(n_total*M2);
    for (int i = 0; i < 4; ++i) {
        h = fold(h ^ l[i]);
    }
    return h;
}

uint64_t llama_kv_policy_state_hash(const void * data, size_t size) {
    llama_kv_state_hash h;
    if (data != nullptr && size > 0) {
        h.update(data, size);
    }
    return h.digest();
}

// -- hooks around the state ------------------------------------------------------

const char * llama_kv_state_access::last_error() {
    return g_last_error.c_str();
}

llama_kv_state_access::size_pass::size_pass()  { ++g_size_pass; }
llama_kv_state_access::size_pass::~size_pass() { --g_size_pass; }

void llama_kv_state_access::file_tokens(const llama_token * tokens, size_t n_tokens) {
    g_file_tokens     = tokens;
    g_n_file_tokens   = n_tokens;
    g_has_file_tokens = true;
}

void llama_kv_state_access::read_string(llama_io_read_i & io, std::string & str) {
    uint32_t n = 0;
    io.read(&n, sizeof(n));
    str.clear();
    std::vector<char> chunk;
    while (n > 0) {
        const uint32_t m = std::min(n, STRING_CHUNK);
        chunk.resize(m);
        io.read(chunk.data(), m); // throws at the end of the stream: nothing larger was allocated
        str.append(chunk.data(), m);
        n -= m;
    }
}

// -- writer ------------------------------------------------------------------------

llama_kv_state_writer::llama_kv_state_writer(llama_context & lctx, llama_io_write_i & io, llama_seq_id seq_id,
                                             llama_state_seq_flags flags)
    : lctx(lctx), io(io), seq_id(seq_id),
      hashing(g_size_pass == 0 && !(flags & LLAMA_STATE_SEQ_FLAGS_ON_DEVICE)) {
    take_file_tokens(hash, hashing);

    llama_kv_cache * kv = llama_kv_score_access::get_kv(lctx);
    if (kv && seq_id != -1 && !llama_kv_score_access::valid_seq(*kv, seq_id)) {
        throw std::runtime_error("sequence id " + std::to_string(seq_id) + " is out of range");
    }
    if (kv) {
        llama_kv_score_access::flush_lazy(lctx, *kv); // the state carries complete scores
    }
    const uint32_t hdr[4] = {
        STATE_MAGIC, STATE_VERSION, policy_flags(llama_kv_score_access::cfg(lctx)), n_state_layers(kv),
    };
    write(hdr, sizeof(hdr));
    const int32_t sid = seq_id;
    write(&sid, sizeof(sid));
}

void llama_kv_state_writer::write(const void * src, size_t size) {
    if (hashing) {
        hash.update(src, size);
    }
    io.write(src, size);
}

void llama_kv_state_writer::write_tensor(ggml_tensor * tensor, size_t offset, size_t size) {
    if (!hashing) {
        io.write_tensor(tensor, offset, size);
        return;
    }
    if (tensor->buffer && ggml_backend_buffer_is_host(tensor->buffer)) {
        // in host memory: hash it in place, the io copies it as before
        hash.update((const uint8_t *) tensor->data + offset, size);
        io.write_tensor(tensor, offset, size);
        return;
    }
    // on a device: fetch it once, hash it and hand the io the same bytes
    scratch.resize(size);
    ggml_backend_tensor_get(tensor, scratch.data(), offset, size);
    hash.update(scratch.data(), size);
    io.write(scratch.data(), size);
}

void llama_kv_state_writer::end() {
    // the RNG belongs to the whole context: a sequence restore must not rewind it
    const uint32_t has_rng = seq_id == -1 ? 1 : 0;
    write(&has_rng, sizeof(has_rng));
    if (has_rng) {
        std::ostringstream os;
        os << llama_kv_score_access::state(lctx).rng;
        write_string(os.str());
    }
    const uint64_t sum = hashing ? hash.digest() : 0;
    io.write(&sum, sizeof(sum)); // not part of what it sums
}

// -- reader ------------------------------------------------------------------------

llama_kv_state_reader::llama_kv_state_reader(llama_context & lctx, llama_io_read_i & io, llama_seq_id seq_id,
                                             llama_state_seq_flags flags)
    : lctx(lctx), io(io), seq_id(seq_id), on_device(flags & LLAMA_STATE_SEQ_FLAGS_ON_DEVICE) {
    g_last_error.clear();
    take_file_tokens(hash, !on_device);
}

void llama_kv_state_reader::read(void * dst, size_t size) {
    io.read(dst, size);
    if (hashing) {
        hash.update(dst, size);
    }
}

void llama_kv_state_reader::read_tensor(ggml_tensor * tensor, size_t offset, size_t size) {
    if (!hashing) {
        io.read_tensor(tensor, offset, size); // as llama.cpp does: applied when the io is done
        return;
    }
    // checked bytes go into the tensor now; a refusal at the end empties the cells they belong to
    if (tensor->buffer && ggml_backend_buffer_is_host(tensor->buffer)) {
        uint8_t * dst = (uint8_t *) tensor->data + offset;
        io.read(dst, size);
        hash.update(dst, size);
        return;
    }
    scratch.resize(size);
    io.read(scratch.data(), size);
    hash.update(scratch.data(), size);
    ggml_backend_tensor_set(tensor, scratch.data(), offset, size);
}

void llama_kv_state_reader::begin() {
    llama_kv_cache * kv = llama_kv_score_access::get_kv(lctx);
    if (kv && seq_id != -1 && !llama_kv_score_access::valid_seq(*kv, seq_id)) {
        fail("a2sf state: destination sequence id %d is out of range", seq_id);
    }
    if (kv) {
        llama_kv_score_access::flush_lazy(lctx, *kv); // the other sequences' pending queries
    }
    // a refused restore leaves its destination empty, whatever refused it
    guard([&] { read_header(); });
}

void llama_kv_state_reader::read_header() {
    llama_kv_cache * kv = llama_kv_score_access::get_kv(lctx);

    // the header is hashed as read; whether the sum is checked depends on its version
    hashing = true;
    uint32_t hdr[4] = { 0, 0, 0, 0 };
    try {
        read(hdr, sizeof(hdr));
    } catch (const std::exception &) {
        fail("a2sf state: the state is too short to hold the a2sf header (truncated?)");
    }
    if (hdr[0] != STATE_MAGIC) {
        fail("a2sf state: no a2sf header (the state was saved by a libllama without a2sf, "
             "or is not a state of this context, or is damaged)");
    }
    if (hdr[1] < STATE_VERSION_OLDEST || hdr[1] > STATE_VERSION) {
        fail("a2sf state: format version %u, this build reads versions %u to %u",
             hdr[1], STATE_VERSION_OLDEST, STATE_VERSION);
    }
    ver = hdr[1];

    const uint32_t flags_have = policy_flags(llama_kv_score_access::cfg(lctx));
    const uint32_t flags_saved = hdr[2];
    if (flags_saved & ~(FLAG_SCORED | FLAG_VALUE_AWARE)) {
        fail("a2sf state: unknown policy flags 0x%x (damaged state?)", flags_saved);
    }
    if (flags_saved != flags_have) {
        fail("a2sf state: saved with %s but this context runs %s; the cells' scores would not "
             "match the policy (set the same kind of kv_policy before loading)",
             describe(flags_saved), describe(flags_have));
    }

    const uint32_t n_layer = n_state_layers(kv);
    if (hdr[3] != n_layer) {
        fail("a2sf state: holds scores of %u KV layers, this context has %u (another model?)",
             hdr[3], n_layer);
    }

    if (ver >= 3) {
        int32_t sid = -2;
        try {
            read(&sid, sizeof(sid));
        } catch (const std::exception &) {
            fail("a2sf state: the state is too short to hold the a2sf header (truncated?)");
        }
        if ((seq_id == -1) != (sid == -1) || sid < -1 || sid >= LLAMA_MAX_SEQ) {
            fail("a2sf state: saved as %s (sequence id %d), restored as %s",
                 sid == -1 ? "a whole context" : "one sequence", sid,
                 seq_id == -1 ? "a whole context" : "one sequence");
        }
        src_seq = sid;
        hashing = !on_device;
    } else {
        // version 2 has no checksum: what follows is only checked field by field
        hashing = false;
        LLAMA_LOG_WARN("%s: a2sf state of format version 2: no checksum to verify\n", __func__);
    }
}

void llama_kv_state_reader::refused(const char * what) {
    if (g_last_error.empty()) {
        g_last_error = std::string("llama.cpp refused the state: ") + what;
    }
    // nothing the failed restore wrote may stay: the context (or the sequence) is emptied,
    // and the K/V rows written so far are zeroed (attention multiplies the V rows of free
    // cells by 0, which a NaN of a damaged row would survive)
    if (llama_memory_t mem = lctx.get_memory()) {
        if (seq_id == -1) {
            mem->clear(true); // zeroes the buffers
        } else if (seq_id >= 0 && (uint32_t) seq_id < lctx.n_seq_max()) {
            for (llama_kv_cache * kv : { llama_kv_score_access::get_kv(lctx), llama_kv_score_access::get_swa(lctx) }) {
                if (kv != nullptr) {
                    kv->state_clear(seq_id); // seq_rm, and zeroes the rows of the cells only this sequence held
                }
            }
            mem->seq_rm(seq_id, -1, -1);
        }
    }
    if (llama_kv_cache * kv = llama_kv_score_access::get_kv(lctx)) {
        llama_kv_units & u = llama_kv_score_access::units(*kv, false);
        if (seq_id == -1) {
            u.n_queries.clear();
        } else {
            u.n_queries.erase(seq_id);
        }
    }
}

void llama_kv_state_reader::end() {
    try {
        uint32_t has_rng = 0;
        read(&has_rng, sizeof(has_rng));
        if (has_rng > 1 || (has_rng == 1) != (seq_id == -1)) {
            fail("a2sf state: malformed trailer (RNG flag %u)", has_rng);
        }
        std::mt19937 rng;
        if (has_rng) {
            uint32_t n = 0;
            read(&n, sizeof(n));
            if (n > MAX_RNG_TEXT) {
                fail("a2sf state: malformed trailer (RNG text of %u bytes)", n);
            }
            std::string text(n, '\0');
            read(text.data(), n);
            std::istringstream is(text);
            is >> rng;
            if (is.fail()) {
                fail("a2sf state: malformed random-policy RNG state");
            }
        }
        if (ver >= 3) {
            const bool checked = hashing;
            hashing = false;
            uint64_t sum = 0;
            read(&sum, sizeof(sum));
            if (checked && sum != hash.digest()) {
                fail("a2sf state: checksum mismatch: the state is damaged (changed bytes after it "
                     "was saved); nothing of it was kept");
            }
        }
        if (has_rng) {
            llama_kv_score_access::state(lctx).rng = rng;
        }
    } catch (const std::exception & e) {
        if (g_last_error.empty()) {
            g_last_error = std::string("a2sf state: the trailer could not be read (truncated?): ") + e.what();
        }
        refused(e.what());
        throw;
    }
}

// -- the cells' score rows and unit map ---------------------------------------------------

void llama_kv_state_access::write_cells(const llama_kv_cache & kv, llama_io_write_i & io, uint32_t strm,
                                        const std::vector<std::pair<uint32_t, uint32_t>> & ranges) {
    uint32_t n_cells = 0;
    for (const auto & r : ranges) {
        n_cells += r.second - r.first;
    }
    const uint32_t hdr[3] = { CELLS_MAGIC, n_state_layers(&kv), n_cells };
    io.write(hdr, sizeof(hdr));

    for (const auto & layer : kv.layers) {
        if (layer.score == nullptr) {
            continue;
        }
        ggml_tensor * score = layer.score; // F32 [kv_size, n_head_kv, n_stream]
        ggml_tensor * vnorm = layer.vnorm; // F32 [n_head_kv, kv_size, n_stream]

        const uint32_t n_head_kv = (uint32_t) score->ne[1];
        io.write(&n_head_kv, sizeof(n_head_kv));

        for (uint32_t h = 0; h < n_head_kv; ++h) {
            for (const auto & r : ranges) {
                io.write_tensor(score, strm*score->nb[2] + h*score->nb[1] + (size_t) r.first*sizeof(float),
                                (size_t) (r.second - r.first)*sizeof(float));
            }
        }
        for (const auto & r : ranges) {
            io.write_tensor(vnorm, strm*vnorm->nb[2] + (size_t) r.first*vnorm->nb[1],
                            (size_t) (r.second - r.first)*vnorm->nb[1]);
        }
    }

    // the unit map of these cells (what each layer/head holds), if the engine keeps one
    const llama_kv_units & u = llama_kv_score_access::units(kv, false);
    const uint32_t n_units = u.allocated() ? u.n_units() : 0;
    io.write(&n_units, sizeof(n_units));
    if (n_units) {
        const uint32_t diverged = u.diverged[strm];
        io.write(&diverged, sizeof(diverged));
        // each array over all ranges in turn: the reader's runs of cells differ from these ranges
        for (uint32_t k = 0; k < n_units; ++k) {
            for (const auto & r : ranges) {
                io.write(&u.pos[u.at(strm, k, r.first)], (size_t) (r.second - r.first)*sizeof(int32_t));
            }
            for (const auto & r : ranges) {
                io.write(&u.born[u.at(strm, k, r.first)], (size_t) (r.second - r.first)*sizeof(int64_t));
            }
        }
        // a sequence state carries its own sequence's query count only
        const auto * wr = dynamic_cast<const llama_kv_state_writer *>(&io);
        const llama_seq_id only = wr ? wr->saved_seq() : -1;
        std::vector<std::pair<int64_t, int64_t>> nq;
        for (const auto & [sid, n] : u.n_queries) {
            if (only == -1 || sid == only) {
                nq.emplace_back(sid, n);
            }
        }
        const uint32_t n_seq = (uint32_t) nq.size();
        io.write(&n_seq, sizeof(n_seq));
        for (const auto & [sid, n] : nq) {
            const int64_t e[2] = { sid, n };
            io.write(e, sizeof(e));
        }
    }
}

bool llama_kv_state_access::read_cells(llama_kv_cache & kv, llama_io_read_i & io, uint32_t strm,
                                       const std::vector<uint32_t> & idxs) {
    const auto * rd = dynamic_cast<const llama_kv_state_reader *>(&io);
    const uint32_t     ver       = rd ? rd->version()   : STATE_VERSION;
    const llama_seq_id dest      = rd ? rd->dest_seq()  : -1;
    const llama_seq_id saved     = rd ? rd->saved_seq() : -1;
    const bool         host_data = rd ? rd->host_data() : false;

    uint32_t hdr[3] = { 0, 0, 0 };
    io.read(hdr, (ver >= 3 ? 3 : 2)*sizeof(uint32_t));
    if (hdr[0] != CELLS_MAGIC) {
        return refuse("the KV cells carry no score block (state saved by a libllama without a2sf, or damaged)");
    }
    const uint32_t n_layer = n_state_layers(&kv);
    if (hdr[1] != n_layer) {
        return refuse("score rows of %u layers, this cache has %u", hdr[1], n_layer);
    }
    const uint32_t n_cells = (uint32_t) idxs.size();
    if (ver >= 3 && hdr[2] != n_cells) {
        return refuse("the score block is for %u cells, the KV rows before it for %u", hdr[2], n_cells);
    }

    // the cells llama.cpp just restored: in range, in use, in a sequence, at a position
    auto & cells = kv.v_cells[strm];
    const uint32_t n_seq_max = kv.n_seq_max;
    std::vector<llama_pos> seq_max(n_seq_max, -1); // newest position per sequence among these cells
    std::vector<std::vector<uint32_t>> seq_cells(n_seq_max); // index into idxs, per sequence
    for (uint32_t i = 0; i < n_cells; ++i) {
        const uint32_t c = idxs[i];
        if (c >= cells.size()) {
            return refuse("cell index %u out of range (%u cells)", c, cells.size());
        }
        if (cells.is_empty(c) || cells.pos_get(c) < 0) {
            return refuse("cell %u was restored without a position", i);
        }
        const llama_pos p = cells.pos_get(c);
        bool any = false;
        for (uint32_t s = 0; s < n_seq_max; ++s) {
            if (cells.seq_has(c, (llama_seq_id) s)) {
                any = true;
                seq_max[s] = std::max(seq_max[s], p);
                seq_cells[s].push_back(i);
            }
        }
        if (!any) {
            return refuse("cell %u (position %d) belongs to no sequence", i, p);
        }
        if (dest != -1 && !cells.seq_has(c, dest)) {
            return refuse("cell %u is not in the restored sequence %d", i, dest);
        }
    }
    // per cell: the newest position of the sequences it belongs to
    std::vector<llama_pos> newest(n_cells, -1);
    for (uint32_t s = 0; s < n_seq_max; ++s) {
        for (uint32_t i : seq_cells[s]) {
            newest[i] = std::max(newest[i], seq_max[s]);
        }
    }
    // one position per token of a sequence (multi-position RoPE shares positions across an image)
    const bool unique_pos = kv.hparams.n_pos_per_embd() == 1;
    std::vector<llama_pos> buf;
    const auto duplicate = [&buf](llama_pos & dup) {
        std::sort(buf.begin(), buf.end());
        const auto it = std::adjacent_find(buf.begin(), buf.end());
        if (it == buf.end()) {
            return false;
        }
        dup = *it;
        return true;
    };
    if (unique_pos) {
        for (uint32_t s = 0; s < n_seq_max; ++s) {
            buf.clear();
            for (uint32_t i : seq_cells[s]) {
                buf.push_back(cells.pos_get(idxs[i]));
            }
            llama_pos dup = -1;
            if (duplicate(dup)) {
                return refuse("two cells of sequence %u hold position %d", s, dup);
            }
        }
    }

    // contiguous runs of destination cells, in the order the rows were written
    struct run { uint32_t from; uint32_t to; uint32_t i0; };
    std::vector<run> runs;
    for (size_t i0 = 0; i0 < idxs.size();) {
        size_t i1 = i0 + 1;
        while (i1 < idxs.size() && idxs[i1] == idxs[i1 - 1] + 1) {
            ++i1;
        }
        runs.push_back({ idxs[i0], idxs[i1 - 1] + 1, (uint32_t) i0 });
        i0 = i1;
    }

    std::vector<float> rows;
    const auto check_rows = [&rows](const char * what, uint32_t il) {
        for (size_t j = 0; j < rows.size(); ++j) {
            if (!std::isfinite(rows[j]) || rows[j] < 0.0f) {
                return refuse("%s of layer %u holds %g at entry %zu (scores and norms are finite and >= 0)",
                              what, il, (double) rows[j], j);
            }
        }
        return true;
    };
    uint32_t il = 0;
    for (const auto & layer : kv.layers) {
        if (layer.score == nullptr) {
            continue;
        }
        ggml_tensor * score = layer.score;
        ggml_tensor * vnorm = layer.vnorm;

        uint32_t n_head_kv_ref = 0;
        io.read(&n_head_kv_ref, sizeof(n_head_kv_ref));
        const uint32_t n_head_kv = (uint32_t) score->ne[1];
        if (n_head_kv_ref != n_head_kv) {
            return refuse("scores of %u KV heads, this layer has %u", n_head_kv_ref, n_head_kv);
        }

        if (!host_data) {
            // device-side sequence state: the rows stay on the device, as llama.cpp's K/V do
            for (uint32_t h = 0; h < n_head_kv; ++h) {
                for (const auto & r : runs) {
                    io.read_tensor(score, strm*score->nb[2] + h*score->nb[1] + (size_t) r.from*sizeof(float),
                                   (size_t) (r.to - r.from)*sizeof(float));
                }
            }
            for (const auto & r : runs) {
                io.read_tensor(vnorm, strm*vnorm->nb[2] + (size_t) r.from*vnorm->nb[1],
                               (size_t) (r.to - r.from)*vnorm->nb[1]);
            }
            ++il;
            continue;
        }

        // score [n_head_kv][n_cells], then vnorm [n_cells][n_head_kv]: checked, then set
        rows.resize((size_t) n_head_kv*n_cells);
        io.read(rows.data(), rows.size()*sizeof(float));
        if (!check_rows("a score row", il)) {
            return false;
        }
        for (uint32_t h = 0; h < n_head_kv; ++h) {
            for (const auto & r : runs) {
                ggml_backend_tensor_set(score, rows.data() + (size_t) h*n_cells + r.i0,
                                        strm*score->nb[2] + h*score->nb[1] + (size_t) r.from*sizeof(float),
                                        (size_t) (r.to - r.from)*sizeof(float));
            }
        }
        io.read(rows.data(), rows.size()*sizeof(float));
        if (!check_rows("a value-norm row", il)) {
            return false;
        }
        for (const auto & r : runs) {
            ggml_backend_tensor_set(vnorm, rows.data() + (size_t) r.i0*n_head_kv,
                                    strm*vnorm->nb[2] + (size_t) r.from*vnorm->nb[1],
                                    (size_t) (r.to - r.from)*vnorm->nb[1]);
        }
        ++il;
    }

    uint32_t n_units_ref = 0;
    io.read(&n_units_ref, sizeof(n_units_ref));
    llama_kv_units & u = llama_kv_score_access::units(kv, n_units_ref > 0);
    if (n_units_ref == 0) {
        // no map saved: every unit holds its cell's token
        if (u.allocated()) {
            for (uint32_t c : idxs) {
                for (uint32_t k = 0; k < u.n_units(); ++k) {
                    u.pos[u.at(strm, k, c)] = cells.is_empty(c) ? -1 : cells.pos_get(c);
                }
            }
        }
        return true;
    }
    if (!u.allocated() || n_units_ref != u.n_units()) {
        return refuse("a map of %u layer/head units, this cache has %u", n_units_ref,
                      u.allocated() ? u.n_units() : 0);
    }
    uint32_t diverged = 0;
    io.read(&diverged, sizeof(diverged));
    if (diverged > 1) {
        return refuse("malformed unit map (diverged flag %u)", diverged);
    }

    // the map, read whole and checked before any of it replaces the cache's
    const uint32_t n_units = u.n_units();
    std::vector<int32_t> pos((size_t) n_units*n_cells);
    std::vector<int64_t> born((size_t) n_units*n_cells);
    for (uint32_t k = 0; k < n_units; ++k) {
        io.read(pos.data()  + (size_t) k*n_cells, (size_t) n_cells*sizeof(int32_t));
        io.read(born.data() + (size_t) k*n_cells, (size_t) n_cells*sizeof(int64_t));
    }
    uint32_t n_seq = 0;
    io.read(&n_seq, sizeof(n_seq));
    if (n_seq > LLAMA_MAX_SEQ || (ver >= 3 && dest != -1 && n_seq > 1)) {
        return refuse("malformed unit map (query counts of %u sequences)", n_seq);
    }
    std::vector<std::pair<int64_t, int64_t>> nq(n_seq);
    for (uint32_t j = 0; j < n_seq; ++j) {
        int64_t e[2] = { 0, 0 };
        io.read(e, sizeof(e));
        const bool in_range = e[0] >= 0 && e[0] < LLAMA_MAX_SEQ && (j == 0 || e[0] > nq[j - 1].first);
        if (!in_range || e[1] < 0 || (ver >= 3 && dest != -1 && e[0] != saved)) {
            return refuse("malformed unit map (query count %lld of sequence %lld)", (long long) e[1], (long long) e[0]);
        }
        nq[j] = { e[0], e[1] };
    }

    const uint32_t nh = std::max<uint32_t>(1, u.n_head_kv);
    for (uint32_t k = 0; k < n_units; ++k) {
        const int32_t * pk = pos.data()  + (size_t) k*n_cells;
        const int64_t * bk = born.data() + (size_t) k*n_cells;
        for (uint32_t i = 0; i < n_cells; ++i) {
            const llama_pos cp = cells.pos_get(idxs[i]);
            if (pk[i] < 0 || pk[i] > newest[i]) {
                return refuse("unit %u (layer %u, head %u) holds position %d in cell %u, outside its sequence's "
                              "positions 0..%d", k, k/nh, k%nh, pk[i], i, newest[i]);
            }
            // a cell's own position is its first unit's token; before any move, every unit's
            if ((k == 0 || !diverged) && pk[i] != cp) {
                return refuse("unit %u (layer %u, head %u) holds position %d in cell %u, whose position is %d",
                              k, k/nh, k%nh, pk[i], i, cp);
            }
            if (bk[i] < 0) {
                return refuse("unit %u holds a token written at query %lld in cell %u", k, (long long) bk[i], i);
            }
        }
        // each unit holds each token of a sequence once
        for (uint32_t s = 0; s < n_seq_max && unique_pos; ++s) {
            if (seq_cells[s].size() < 2) {
                continue;
            }
            buf.clear();
            for (uint32_t i : seq_cells[s]) {
                buf.push_back(pk[i]);
            }
            llama_pos dup = -1;
            if (duplicate(dup)) {
                return refuse("unit %u (layer %u, head %u) holds position %d twice in sequence %u",
                              k, k/nh, k%nh, dup, s);
            }
        }
    }

    // checked: the map replaces the cache's for these cells
    for (uint32_t k = 0; k < n_units; ++k) {
        for (uint32_t i = 0; i < n_cells; ++i) {
            u.pos [u.at(strm, k, idxs[i])] = pos [(size_t) k*n_cells + i];
            u.born[u.at(strm, k, idxs[i])] = born[(size_t) k*n_cells + i];
        }
    }
    if (dest == -1) {
        u.diverged[strm] = (uint8_t) diverged;
        for (const auto & [sid, n] : nq) {
            if (sid < (int64_t) n_seq_max) { // a sequence this context cannot hold has no cells here either
                u.n_queries[(int32_t) sid] = n;
            }
        }
    } else {
        // other sequences of a shared stream may have moved tokens: the flag only grows
        u.diverged[strm] = (uint8_t) (u.diverged[strm] | diverged);
        if (ver >= 3) {
            if (nq.empty()) {
                u.n_queries.erase(dest);
            } else {
                u.n_queries[dest] = nq[0].second;
            }
        } else {
            for (const auto & [sid, n] : nq) { // version 2 carried every sequence's count
                auto & q = u.n_queries[(int32_t) sid];
                q = std::max(q, n);
            }
        }
    }
    return true;
}

const char * llama_kv_policy_state_error(void) {
    return llama_kv_state_access::last_error();
}
