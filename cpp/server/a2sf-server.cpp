// a2sf inside llama-server: see a2sf-server.h.
#include "a2sf-server.h"

#include "arg.h"
#include "common.h"
#include "log.h"
#include "llama-kv-policy.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct a2sf_setting_def {
    const char * flag;
    const char * name;     // the SETTINGS row (a2sf.Llama keyword)
    const char * field;    // KVPolicy field, nullptr: not a policy field
    char         type;     // 'i', 'f', 'b', 's'
    double       lo, hi;   // inclusive range of 'i' / 'f'
    const char * lo_text;
    const char * hi_text;
    const char * choices;  // '|'-separated values of 's'
    const char * def;      // default as text ("" = unset)
    const char * help;
};

struct a2sf_field_value {
    double       value;   // as llama_kv_policy_params holds it (choices: their index)
    bool         pinned;  // the policy fixes it (init=False in policies.py)
    const char * repr;    // Python repr of the value, for messages
};

// A2SF_SETTINGS, A2SF_FIELDS, struct a2sf_policy_def (its fields sized by A2SF_FIELDS) and A2SF_POLICIES
#include "a2sf-server-settings.inc"

constexpr size_t N_SETTINGS = sizeof(A2SF_SETTINGS) / sizeof(A2SF_SETTINGS[0]);
constexpr size_t N_FIELDS   = sizeof(A2SF_FIELDS) / sizeof(A2SF_FIELDS[0]);
static_assert(N_FIELDS == sizeof(A2SF_NATIVE) / sizeof(A2SF_NATIVE[0]), "A2SF_NATIVE names each KVPolicy field's C field");
static_assert(N_FIELDS == sizeof(a2sf_policy_def::fields) / sizeof(a2sf_field_value),
              "a2sf_policy_def::fields has one entry per KVPolicy field");

struct server_state {
    // command line, as given (the last of repeated flags wins)
    std::string              policy_arg;
    bool                     policy_given = false;
    std::map<size_t, std::string> given;  // SETTINGS index -> value text

    // resolved by a2sf_server_check
    bool                     active = false;   // a policy other than none
    const a2sf_policy_def *  policy = nullptr;
    llama_kv_policy_params   params{};
    int32_t                  positions = LLAMA_KV_POSITIONS_ABSOLUTE; // enum llama_kv_positions
    bool                     positions_given = false;

    // per sequence (slot id)
    llama_pos                n_ctx_train = 0;
    int32_t                  n_batch = 0;
    int32_t                  n_cells = 0;      // a slot's cells
    int32_t                  n_chunk = 0;      // a slot's prompt chunk (0: n_ctx unknown before the model)
    std::vector<int64_t>     offset, n_evictions, n_cells_evicted, n_compactions;
    std::vector<int64_t>     next_after;       // the position a slot's last compaction returned (0: none)
    std::vector<int64_t>     n_unheld;         // positions below it that held no cell right after it
    std::vector<int32_t>     cells_before, added;
    llama_context *          ctx = nullptr;
    bool                     warned_shared = false;
};

server_state & st() {
    static server_state s;
    return s;
}

const char * positions_name(int32_t mode) {
    static const char * names[] = {"cache", "training", "absolute"}; // enum llama_kv_positions
    return mode >= 0 && mode < 3 ? names[mode] : "?";
}

const a2sf_setting_def * setting(const char * name) {
    for (const auto & s : A2SF_SETTINGS) {
        if (strcmp(s.name, name) == 0) {
            return &s;
        }
    }
    return nullptr;
}

int field_index(const char * field) {
    for (size_t i = 0; i < N_FIELDS; ++i) {
        if (strcmp(A2SF_FIELDS[i], field) == 0) {
            return (int) i;
        }
    }
    return -1;
}

std::vector<std::string> split_choices(const char * choices) {
    std::vector<std::string> out;
    std::string cur;
    for (const char * p = choices; *p; ++p) {
        if (*p == '|') {
            out.push_back(cur);
            cur.clear();
        } else {
            cur += *p;
        }
    }
    out.push_back(cur);
    return out;
}

std::string join(const std::vector<std::string> & v, const char * sep) {
    std::string out;
    for (size_t i = 0; i < v.size(); ++i) {
        out += (i ? sep : "") + v[i];
    }
    return out;
}

std::string py_repr(const std::string & s) {
    return "'" + s + "'";
}

// One setting's value text as a number (or choice index), or std::invalid_argument with
// the message policies.py's Setting.check gives.
double parse_value(const a2sf_setting_def & s, const std::string & text) {
    const std::string what = s.name;
    const std::string bounds = std::string("[") + s.lo_text + ", " + s.hi_text + "]";
    switch (s.type) {
        case 'b': {
            std::string t = text;
            std::transform(t.begin(), t.end(), t.begin(), ::tolower);
            if (t == "1" || t == "true" || t == "on" || t == "yes") return 1.0;
            if (t == "0" || t == "false" || t == "off" || t == "no") return 0.0;
            throw std::invalid_argument(what + " must be a bool, got " + py_repr(text));
        }
        case 'i': {
            errno = 0;
            char * end = nullptr;
            const long long v = text.empty() ? 0 : strtoll(text.c_str(), &end, 10);
            if (text.empty() || *end != '\0' || errno == ERANGE) {
                if (!text.empty() && *end == '\0') {  // an integer, out of range of long long
                    throw std::invalid_argument(what + " must be in " + bounds + ", got " + text);
                }
                throw std::invalid_argument(what + " must be an int, got " + py_repr(text));
            }
            if ((double) v < s.lo || (double) v > s.hi) {
                throw std::invalid_argument(what + " must be in " + bounds + ", got " + text);
            }
            return (double) v;
        }
        case 'f': {
            char * end = nullptr;
            const double v = text.empty() ? 0.0 : strtod(text.c_str(), &end);
            if (text.empty() || *end != '\0') {
                throw std::invalid_argument(what + " must be a real number in " + bounds + ", got " + py_repr(text));
            }
            if (std::isnan(v) || v < s.lo || v > s.hi) {
                throw std::invalid_argument(what + " must be in " + bounds + ", got " + text);
            }
            return v;
        }
        case 's': {
            const auto ch = split_choices(s.choices);
            for (size_t i = 0; i < ch.size(); ++i) {
                if (ch[i] == text) {
                    return (double) i;
                }
            }
            throw std::invalid_argument(what + " must be one of " + join(ch, ", ") + ", got " + py_repr(text));
        }
    }
    throw std::invalid_argument(what + ": unsupported setting type");
}

const a2sf_policy_def * find_policy(const std::string & spec) {
    std::string key;
    bool started = false;
    for (char c : spec) {  // make_policy: strip, lower, drop '-' and '_'
        if (!started && isspace((unsigned char) c)) continue;
        started = true;
        if (c == '-' || c == '_') continue;
        key += (char) tolower((unsigned char) c);
    }
    while (!key.empty() && isspace((unsigned char) key.back())) key.pop_back();
    for (const auto & a : A2SF_ALIASES) {
        if (key == a[0]) {
            key = a[1];
            break;
        }
    }
    for (const auto & p : A2SF_POLICIES) {
        if (key == p.name) {
            return &p;
        }
    }
    return nullptr;
}

void record(size_t i, const std::string & value) {
    st().given[i] = value;
}

// one handler per setting row (common_arg takes plain function pointers)
template <size_t I> void on_value(common_params &, const std::string & v) { record(I, v); }
template <size_t I> void on_flag(common_params &) { record(I, "true"); }

template <size_t... I>
void add_setting_args(common_params_context & ctx_arg, std::index_sequence<I...>) {
    (void) std::initializer_list<int>{([&] {
        const auto & s = A2SF_SETTINGS[I];
        std::string help = std::string("a2sf: ") + s.help;
        if (s.choices) {
            help += std::string(" (") + join(split_choices(s.choices), ", ") + ")";
        }
        if (s.type == 'i' || s.type == 'f') {
            help += std::string(" (range [") + s.lo_text + ", " + s.hi_text + "])";
        }
        if (s.def[0]) {
            help += std::string(" (default of most policies: ") + s.def + ")";
        }
        if (s.type == 'b') {
            ctx_arg.options.push_back(common_arg({s.flag}, help, on_flag<I>).set_examples({LLAMA_EXAMPLE_SERVER}));
        } else {
            const char * hint = s.type == 'i' ? "N" : s.type == 'f' ? "F" : "NAME";
            ctx_arg.options.push_back(common_arg({s.flag}, hint, help, on_value<I>).set_examples({LLAMA_EXAMPLE_SERVER}));
        }
        return 0;
    }())...};
}

std::string policy_names() {
    std::vector<std::string> v;
    for (const auto & p : A2SF_POLICIES) v.push_back(p.name);
    return join(v, ", ");
}

// Resolve the recorded flags as policy_from_settings does; throws std::invalid_argument.
void resolve() {
    auto & s = st();
    std::vector<std::pair<const a2sf_setting_def *, double>> fields;  // policy fields given
    std::vector<std::string> field_names;
    for (const auto & [i, text] : s.given) {
        const auto & def = A2SF_SETTINGS[i];
        double v;
        try {
            v = parse_value(def, text);
        } catch (const std::invalid_argument & e) {
            throw std::invalid_argument(std::string(def.flag) + ": " + e.what());
        }
        if (def.field) {
            fields.emplace_back(&def, v);
            field_names.push_back(py_repr(def.field));
        } else if (strcmp(def.name, "positions") == 0) {
            s.positions = (int32_t) v; // the index of its choices: cache, training, absolute (enum llama_kv_positions)
            s.positions_given = true;
        }
    }
    if (!s.policy_given) {
        if (!fields.empty()) {
            std::sort(field_names.begin(), field_names.end());
            throw std::invalid_argument("policy settings [" + join(field_names, ", ") +
                "] given without a policy (kv_policy is None); name one of " + A2SF_POLICY_LIST);
        }
        if (s.positions_given) {
            throw std::invalid_argument("--kv-positions: positions needs a kv_policy other than none "
                "(without one nothing is evicted and the limit is n_ctx)");
        }
        return;
    }
    const a2sf_policy_def * p = find_policy(s.policy_arg);
    if (!p) {
        throw std::invalid_argument("--kv-policy: unknown KV policy " + py_repr(s.policy_arg) +
            "; expected one of " + A2SF_POLICY_LIST);
    }
    double values[N_FIELDS];
    for (size_t f = 0; f < N_FIELDS; ++f) {
        values[f] = p->fields[f].value;
    }
    for (const auto & [def, v] : fields) {
        const int f = field_index(def->field);
        if (p->fields[f].pinned) {
            throw std::invalid_argument(std::string(def->flag) + ": " + p->cls + " fixes " + def->field + "=" +
                p->fields[f].repr + "; it cannot be overridden (settable: " + p->settable + ")");
        }
        values[f] = v;
    }
    s.policy = p;
    s.active = p->kind != LLAMA_KV_POLICY_NONE;
    if (!s.active && s.positions_given) {
        throw std::invalid_argument("--kv-positions: positions needs a kv_policy other than none "
            "(without one nothing is evicted and the limit is n_ctx)");
    }
    // each KVPolicy field into its field of llama_kv_policy_params, checked by the engine
    // (the flag's text was checked by parse_value with the same table's range)
    llama_kv_policy_params & kp = s.params;
    kp = llama_kv_policy_default_params();
    kp.kind = p->kind;
    for (size_t f = 0; f < N_FIELDS; ++f) {
        if (A2SF_NATIVE[f] == nullptr) {
            continue;
        }
        char msg[512] = "no such field of llama_kv_policy_params";
        const int32_t i = llama_kv_policy_setting_index(A2SF_NATIVE[f]);
        if (i < 0 || llama_kv_policy_set_value(&kp, i, values[f], msg, sizeof(msg)) != 0) {
            throw std::invalid_argument(std::string("--kv-policy ") + p->name + ": " + A2SF_FIELDS[f] + ": " + msg);
        }
    }

    // positions left unset: the engine's default, in a2sf_server_attach (it depends on the
    // model and on the granularity llama_kv_policy_set resolves)
}

void grow(int32_t seq_id) {
    auto & s = st();
    const size_t n = (size_t) seq_id + 1;
    if (s.offset.size() < n) {
        s.offset.resize(n, 0);
        s.n_evictions.resize(n, 0);
        s.n_cells_evicted.resize(n, 0);
        s.n_compactions.resize(n, 0);
        s.next_after.resize(n, 0);
        s.n_unheld.resize(n, 0);
        s.cells_before.resize(n, 0);
        s.added.resize(n, 0);
    }
}

} // namespace

void a2sf_server_add_args(common_params_context & ctx_arg) {
    if (ctx_arg.ex != LLAMA_EXAMPLE_SERVER) {
        return;
    }
    ctx_arg.options.push_back(common_arg(
        {"--kv-policy"}, "NAME",
        "a2sf: KV-cache eviction policy (" + policy_names() + "); with one, a slot whose conversation "
        "outgrows its cells evicts instead of shifting the context or failing (see docs/SERVER.md)",
        [](common_params &, const std::string & v) {
            st().policy_arg = v;
            st().policy_given = true;
        }).set_examples({LLAMA_EXAMPLE_SERVER}));
    add_setting_args(ctx_arg, std::make_index_sequence<N_SETTINGS>{});
}

bool a2sf_server_check(common_params & params) {
    auto & s = st();
    try {
        resolve();
    } catch (const std::invalid_argument & e) {
        fprintf(stderr, "error: %s\n", e.what());
        return false;
    }
    if (!s.active) {
        return true;
    }
    for (const auto t : params.speculative.types) {
        if (t != COMMON_SPECULATIVE_TYPE_NONE) {
            fprintf(stderr, "error: --kv-policy: speculative decoding is not supported with eviction "
                            "(the draft would verify against cells the policy evicted)\n");
            return false;
        }
    }
    // Each slot's prompt goes in chunks of n_chunk tokens aligned on its own token index
    // (a2sf_server_chunk_end), each chunk in a llama_decode of its own (the server's batch
    // holds every slot's chunk or token; patch 0010 splits it into views): a slot then
    // evicts at the same tokens and keeps the same cells as it would alone. A chunk must fit
    // beside the protected cells of its stream (python/a2sf/_llama/batch.py).
    if (params.n_ctx > 0) {
        const int32_t n_par   = std::max(1, params.n_parallel);
        const int32_t cells   = params.kv_unified ? params.n_ctx : params.n_ctx / n_par;
        const int32_t n_seq   = params.kv_unified ? n_par : 1;  // sequences sharing a stream
        const int64_t protect = (int64_t) s.params.n_sink + std::max(0, s.params.n_recent); // -1: half of what is kept
        const int64_t room    = cells / n_seq - protect;        // cells left per sequence for a chunk
        if (room <= 1) {
            fprintf(stderr, "error: --kv-policy: n_sink + n_recent = %lld leaves no room for a batch in a "
                            "slot's %d cells; lower --kv-sink/--kv-recent or raise -c\n",
                    (long long) protect, cells / n_seq);
            return false;
        }
        int32_t chunk = params.n_batch;
        if (chunk >= room) {
            // a quarter of the cache at most: one prefill chunk never evicts most of what
            // the scores have learnt
            chunk = (int32_t) std::max<int64_t>(1, std::min<int64_t>(room - 1, cells / n_seq / 4));
            LOG_INF("a2sf: n_batch %d does not fit beside the protected cells of a slot (%d cells, %lld protected): "
                    "each slot's prompt goes in chunks of %d\n", params.n_batch, cells / n_seq, (long long) protect, chunk);
        }
        s.n_chunk       = chunk;
        params.n_batch  = chunk * n_par + n_par;  // every slot's chunk (or token) in one server batch
        params.n_ubatch = std::min(params.n_ubatch, params.n_batch);
    }
    s.n_batch = params.n_batch;
    return true;
}

int32_t a2sf_server_chunk_end(int32_t n_tokens) {
    const auto & s = st();
    if (!s.active || s.n_chunk <= 0) {
        return INT32_MAX;
    }
    return n_tokens - n_tokens % s.n_chunk + s.n_chunk;
}

bool a2sf_server_attach(llama_context * ctx, const common_params & params) {
    auto & s = st();
    if (!s.active) {
        return true;
    }
    static const char * errs[] = {"", "an argument is out of range", "the context has no plain KV cache",
                                  "sequence id out of range", "buffer too small", "positions cannot be shifted",
                                  "a cell is shared", "not possible in this state"};
    const int32_t rc = llama_kv_policy_set(ctx, &s.params);
    if (rc != 0) {
        LOG_ERR("a2sf: --kv-policy %s: llama_kv_policy_set failed (%d: %s)\n", s.policy->name, rc,
                -rc < 8 ? errs[-rc] : "?");
        return false;
    }
    llama_kv_policy_get(ctx, &s.params); // the policy in force (granularity AUTO resolved)
    const llama_model * model = llama_get_model(ctx);
    s.n_ctx_train = llama_model_n_ctx_train(model);
    s.ctx = ctx;
    // the positions default is the engine's (llama_kv_policy_default_positions, as a2sf.Llama's):
    // absolute where K cannot be re-rotated, training per layer or head, else cache
    const int32_t def_positions = llama_kv_policy_default_positions(ctx);
    if (!s.positions_given) {
        s.positions = def_positions;
    } else if (s.positions != LLAMA_KV_POSITIONS_ABSOLUTE && def_positions == LLAMA_KV_POSITIONS_ABSOLUTE) {
        LOG_ERR("a2sf: --kv-positions %s: this model's positions cannot be re-rotated; use --kv-positions absolute\n",
                positions_name(s.positions));
        return false;
    }
    const int32_t n_seq   = std::max(1, (int32_t) llama_n_seq_max(ctx));
    const int32_t cells   = params.kv_unified ? (int32_t) llama_n_ctx(ctx) / n_seq : (int32_t) llama_n_ctx_seq(ctx);
    const int64_t protect = (int64_t) s.params.n_sink + std::max(0, s.params.n_recent);
    if (s.n_chunk <= 0) {  // -c 0: the training context, known only now
        s.n_chunk = (int32_t) std::max<int64_t>(1, std::min<int64_t>((int64_t) llama_n_batch(ctx) / n_seq, cells / 4));
    }
    if ((int64_t) s.n_chunk + protect >= cells) {
        LOG_ERR("a2sf: --kv-policy: a prompt chunk of %d + protected cells %lld must be < a slot's %d cells; "
                "pass -b <= %lld\n", s.n_chunk, (long long) protect, cells, (long long) (cells - protect - 1));
        return false;
    }
    s.n_batch = (int32_t) llama_n_batch(ctx);
    s.n_cells = cells;
    grow(n_seq - 1);
    LOG_INF("a2sf: kv policy %s (kind %d, forgetting_factor %.3g, value_aware %d, mean_attention %d, n_sink %d, "
            "n_recent %d, evict_chunk %d, granularity %d), positions %s, %d sequences, %d cells each, prompt chunks of %d\n",
            s.policy->name, s.params.kind, s.params.forgetting_factor, s.params.value_aware, s.params.mean_attention,
            s.params.n_sink, s.params.n_recent, s.params.evict_chunk, s.params.granularity, positions_name(s.positions),
            n_seq, cells, s.n_chunk);
    return true;
}

bool a2sf_server_evicts() {
    return st().active && st().ctx != nullptr;
}

void a2sf_server_batch_begin() {
    auto & s = st();
    std::fill(s.added.begin(), s.added.end(), 0);
}

llama_pos a2sf_server_pos(int32_t seq_id, llama_pos pos) {
    auto & s = st();
    if (!s.active || seq_id < 0) {
        return pos;
    }
    grow(seq_id);
    s.added[seq_id]++;
    return pos - (llama_pos) s.offset[seq_id];
}

void a2sf_server_before_decode(llama_context * ctx) {
    auto & s = st();
    if (!s.active || ctx != s.ctx) {
        return;
    }
    for (size_t sid = 0; sid < s.added.size(); ++sid) {
        if (s.added[sid] > 0) {
            s.cells_before[sid] = std::max(0, llama_kv_policy_n_cells(ctx, (llama_seq_id) sid));
        }
    }
}

void a2sf_server_after_decode(llama_context * ctx) {
    auto & s = st();
    if (!s.active || ctx != s.ctx) {
        return;
    }
    llama_memory_t mem = llama_get_memory(ctx);
    for (size_t sid = 0; sid < s.added.size(); ++sid) {
        if (s.added[sid] == 0) {
            continue;
        }
        const int32_t n_cells = llama_kv_policy_n_cells(ctx, (llama_seq_id) sid);
        if (n_cells < 0) {
            continue;
        }
        const int64_t freed = (int64_t) s.cells_before[sid] + s.added[sid] - n_cells;
        if (freed > 0) {
            s.n_evictions[sid]++;
            s.n_cells_evicted[sid] += freed;
        }
        // the engine's rule (llama_kv_policy_wants_compaction, as a2sf.Llama's): the next
        // batch of this slot starts right after its newest position
        const llama_pos pos_max = llama_memory_seq_pos_max(mem, (llama_seq_id) sid);
        const llama_kv_positions_state ps = {s.positions, (int64_t) s.n_ctx_train, (int64_t) s.n_cells,
                                             s.next_after[sid], s.n_unheld[sid]};
        if (llama_kv_policy_wants_compaction(ctx, (llama_seq_id) sid, &ps, pos_max + 1, s.n_batch) != 1) {
            continue;
        }
        const int32_t n = llama_kv_policy_compact(ctx, (llama_seq_id) sid);
        if (n >= 0) {
            s.next_after[sid] = n;
            s.n_unheld[sid]   = (int64_t) n - std::max(0, llama_kv_policy_n_cells(ctx, (llama_seq_id) sid));
            if (n < pos_max + 1) { // it lowered the positions (else every position below is held)
                s.offset[sid] += (int64_t) pos_max + 1 - n;
                s.n_compactions[sid]++;
            }
        } else if (!s.warned_shared) {
            s.warned_shared = true;
            LOG_WRN("a2sf: compaction of sequence %zu failed (%d); its positions stay absolute\n", sid, n);
        }
    }
}

void a2sf_server_seq_rm(int32_t seq_id, llama_pos p0) {
    auto & s = st();
    if (!s.active || p0 > 0 || seq_id < 0) {
        return;
    }
    grow(seq_id);
    s.offset[seq_id] = 0;
    s.next_after[seq_id] = 0;
    s.n_unheld[seq_id] = 0;
}

std::string a2sf_server_slot_json(int32_t seq_id) {
    auto & s = st();
    if (!s.active || !s.ctx || seq_id < 0) {
        return "null";
    }
    grow(seq_id);
    char buf[512];
    snprintf(buf, sizeof(buf),
             "{\"policy\": \"%s\", \"positions\": \"%s\", \"cells\": %d, \"evictions\": %lld, \"cells_evicted\": %lld, "
             "\"compactions\": %lld, \"position_offset\": %lld}",
             s.policy->name, positions_name(s.positions), llama_kv_policy_n_cells(s.ctx, seq_id),
             (long long) s.n_evictions[seq_id], (long long) s.n_cells_evicted[seq_id],
             (long long) s.n_compactions[seq_id], (long long) s.offset[seq_id]);
    return buf;
}
