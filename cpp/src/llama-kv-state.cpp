// a2sf: scores and value norms in llama.cpp's state (see llama-kv-state.h for
// the layout). A restored context continues to evict exactly as the original:
// every cell gets back its per-layer score and value norms, and a whole-context
// restore also brings back the random policy's RNG.
//
// Nothing here may abort on bad input: a state from another context, another
// model, a libllama without a2sf or a truncated buffer is refused with an
// exception (llama.cpp turns it into a 0 return) and a message kept for
// llama_kv_policy_state_error().

#include "llama-kv-state.h"
#include "llama-kv-score.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache.h"
#include "llama-kv-policy.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>

namespace {

constexpr uint32_t STATE_MAGIC   = 0x46533241; // "A2SF"
constexpr uint32_t CELLS_MAGIC   = 0x43533241; // "A2SC"
constexpr uint32_t STATE_VERSION = 2; // 2: per-head scores, the (layer, head) unit map

constexpr uint32_t FLAG_SCORED      = 1u << 0; // scores were maintained (score-ranked policy)
constexpr uint32_t FLAG_VALUE_AWARE = 1u << 1; // value norms were maintained (VATP)

// why the last restore on this thread failed; the Python layer reads it right
// after the failed call, on the same thread
thread_local std::string g_last_error;

[[noreturn]] void fail(const char * fmt, ...) {
    char buf[512];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    g_last_error = buf;
    throw std::runtime_error(g_last_error);
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

} // namespace

const char * llama_kv_state_access::last_error() {
    return g_last_error.c_str();
}

void llama_kv_state_access::write_begin(llama_context & lctx, llama_io_write_i & io, llama_seq_id seq_id) {
    const llama_kv_cache * kv = llama_kv_score_access::get_kv(lctx);
    if (kv && seq_id != -1 && !llama_kv_score_access::valid_seq(*kv, seq_id)) {
        throw std::runtime_error("sequence id " + std::to_string(seq_id) + " is out of range");
    }
    if (llama_kv_cache * k = llama_kv_score_access::get_kv(lctx)) {
        llama_kv_score_access::flush_lazy(lctx, *k); // the state carries complete scores
    }
    const uint32_t hdr[4] = {
        STATE_MAGIC, STATE_VERSION, policy_flags(llama_kv_score_access::cfg(lctx)), n_state_layers(kv),
    };
    io.write(hdr, sizeof(hdr));
}

void llama_kv_state_access::write_end(llama_context & lctx, llama_io_write_i & io, llama_seq_id seq_id) {
    // the RNG belongs to the whole context: a sequence restore must not rewind it
    const uint32_t has_rng = seq_id == -1 ? 1 : 0;
    io.write(&has_rng, sizeof(has_rng));
    if (has_rng) {
        std::ostringstream os;
        os << llama_kv_score_access::state(lctx).rng;
        io.write_string(os.str());
    }
}

void llama_kv_state_access::read_begin(llama_context & lctx, llama_io_read_i & io, llama_seq_id seq_id) {
    g_last_error.clear();

    const llama_kv_cache * kv = llama_kv_score_access::get_kv(lctx);
    if (kv && seq_id != -1 && !llama_kv_score_access::valid_seq(*kv, seq_id)) {
        fail("a2sf state: destination sequence id %d is out of range", seq_id);
    }
    if (llama_kv_cache * k = llama_kv_score_access::get_kv(lctx)) {
        llama_kv_score_access::flush_lazy(lctx, *k); // the other sequences' pending queries
    }

    uint32_t hdr[4] = { 0, 0, 0, 0 };
    try {
        io.read(hdr, sizeof(hdr));
    } catch (const std::exception &) {
        fail("a2sf state: the state is too short to hold the a2sf header (truncated?)");
    }
    if (hdr[0] != STATE_MAGIC) {
        fail("a2sf state: no a2sf header (the state was saved by a libllama without a2sf, "
             "or is not a state of this context)");
    }
    if (hdr[1] != STATE_VERSION) {
        fail("a2sf state: format version %u, this build reads version %u", hdr[1], STATE_VERSION);
    }

    const uint32_t flags_have = policy_flags(llama_kv_score_access::cfg(lctx));
    const uint32_t flags_saved = hdr[2];
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
}

void llama_kv_state_access::read_end(llama_context & lctx, llama_io_read_i & io, llama_seq_id seq_id) {
    uint32_t has_rng = 0;
    io.read(&has_rng, sizeof(has_rng));
    if (has_rng > 1 || (has_rng == 1) != (seq_id == -1)) {
        fail("a2sf state: malformed trailer (RNG flag %u)", has_rng);
    }
    if (has_rng) {
        std::string text;
        io.read_string(text);
        std::istringstream is(text);
        std::mt19937 rng;
        is >> rng;
        if (is.fail()) {
            fail("a2sf state: malformed random-policy RNG state");
        }
        llama_kv_score_access::state(lctx).rng = rng;
    }
}

void llama_kv_state_access::write_cells(const llama_kv_cache & kv, llama_io_write_i & io, uint32_t strm,
                                        const std::vector<std::pair<uint32_t, uint32_t>> & ranges) {
    const uint32_t n_layer = n_state_layers(&kv);
    const uint32_t hdr[2] = { CELLS_MAGIC, n_layer };
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
        const uint32_t n_seq = (uint32_t) u.n_queries.size();
        io.write(&n_seq, sizeof(n_seq));
        for (const auto & [sid, nq] : u.n_queries) {
            const int64_t e[2] = { sid, nq };
            io.write(e, sizeof(e));
        }
    }
}

static bool state_refuse(const std::string & why) {
    g_last_error = "a2sf state: " + why;
    LLAMA_LOG_ERROR("%s: %s\n", __func__, g_last_error.c_str());
    return false;
}

bool llama_kv_state_access::read_cells(llama_kv_cache & kv, llama_io_read_i & io, uint32_t strm,
                                       const std::vector<uint32_t> & idxs) {
    uint32_t hdr[2] = { 0, 0 };
    io.read(hdr, sizeof(hdr));
    if (hdr[0] != CELLS_MAGIC) {
        return state_refuse("the KV cells carry no score block (state saved by a libllama without a2sf?)");
    }
    const uint32_t n_layer = n_state_layers(&kv);
    if (hdr[1] != n_layer) {
        return state_refuse("score rows of " + std::to_string(hdr[1]) + " layers, this cache has " +
                            std::to_string(n_layer));
    }

    // contiguous runs of destination cells, in the order the rows were written
    struct run { uint32_t from; uint32_t to; };
    std::vector<run> runs;
    for (size_t i0 = 0; i0 < idxs.size();) {
        size_t i1 = i0 + 1;
        while (i1 < idxs.size() && idxs[i1] == idxs[i1 - 1] + 1) {
            ++i1;
        }
        runs.push_back({ idxs[i0], idxs[i1 - 1] + 1 });
        i0 = i1;
    }

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
            return state_refuse("scores of " + std::to_string(n_head_kv_ref) + " KV heads, this layer has " +
                                std::to_string(n_head_kv));
        }

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
    }

    uint32_t n_units_ref = 0;
    io.read(&n_units_ref, sizeof(n_units_ref));
    llama_kv_units & u = llama_kv_score_access::units(kv, n_units_ref > 0);
    if (n_units_ref == 0) {
        // no map saved: every unit holds its cell's token
        if (u.allocated()) {
            const auto & cells = kv.v_cells[strm];
            for (uint32_t c : idxs) {
                for (uint32_t k = 0; k < u.n_units(); ++k) {
                    u.pos[u.at(strm, k, c)] = cells.is_empty(c) ? -1 : cells.pos_get(c);
                }
            }
        }
        return true;
    }
    if (!u.allocated() || n_units_ref != u.n_units()) {
        return state_refuse("a map of " + std::to_string(n_units_ref) + " layer/head units, this cache has " +
                            std::to_string(u.allocated() ? u.n_units() : 0));
    }
    uint32_t diverged = 0;
    io.read(&diverged, sizeof(diverged));
    u.diverged[strm] = diverged != 0;
    for (uint32_t k = 0; k < u.n_units(); ++k) {
        for (const auto & r : runs) {
            io.read(&u.pos[u.at(strm, k, r.from)], (size_t) (r.to - r.from)*sizeof(int32_t));
        }
        for (const auto & r : runs) {
            io.read(&u.born[u.at(strm, k, r.from)], (size_t) (r.to - r.from)*sizeof(int64_t));
        }
    }
    uint32_t n_seq = 0;
    io.read(&n_seq, sizeof(n_seq));
    if (n_seq > LLAMA_MAX_SEQ) {
        return state_refuse("malformed unit map (" + std::to_string(n_seq) + " sequences)");
    }
    for (uint32_t i = 0; i < n_seq; ++i) {
        int64_t e[2] = { 0, 0 };
        io.read(e, sizeof(e));
        auto & nq = u.n_queries[(int32_t) e[0]];
        nq = std::max(nq, e[1]);
    }
    return true;
}

const char * llama_kv_policy_state_error(void) {
    return llama_kv_state_access::last_error();
}
