// pybind11 bindings of the eviction engine's C API (cpp/include/llama-kv-policy.h).
//
// Every function takes the llama_context as a Python int (the address held by
// llama-cpp-python's `llm._ctx.ctx`, a ctypes c_void_p: pass `.value`; a
// c_void_p itself is accepted too). A NULL context raises ValueError; negative
// return codes of the C API become ValueError / RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "llama-kv-policy.h"

namespace py = pybind11;

namespace {

llama_context * as_ctx(const py::object & obj) {
    py::object v = obj;
    if (!v.is_none() && !py::isinstance<py::int_>(v) && py::hasattr(v, "value")) {
        v = v.attr("value");  // ctypes.c_void_p
    }
    if (v.is_none()) {
        throw py::value_error("llama_context is NULL (was the model closed?)");
    }
    if (py::isinstance<py::bool_>(v) || !py::isinstance<py::int_>(v)) {
        throw py::type_error("ctx must be the llama_context address as an int, got " +
                             std::string(py::str(py::type::of(v).attr("__name__"))));
    }
    unsigned long long addr = PyLong_AsUnsignedLongLong(v.ptr());
    if (PyErr_Occurred()) {
        PyErr_Clear();
        throw py::value_error("ctx is not a valid pointer value");
    }
    if (addr == 0) {
        throw py::value_error("llama_context is NULL (was the model closed?)");
    }
    return reinterpret_cast<llama_context *>(static_cast<uintptr_t>(addr));
}

// Turns a negative LLAMA_KV_POLICY_ERR_* code into a Python exception.
int32_t check(int32_t rc, const char * what) {
    if (rc >= 0) {
        return rc;
    }
    std::string msg = std::string(what) + ": ";
    switch (rc) {
        case LLAMA_KV_POLICY_ERR_ARG:
            throw py::value_error(msg + "argument out of range (LLAMA_KV_POLICY_ERR_ARG)");
        case LLAMA_KV_POLICY_ERR_MEMORY:
            throw std::runtime_error(msg +
                "the context has no plain KV cache (recurrent, hybrid or iSWA model; "
                "LLAMA_KV_POLICY_ERR_MEMORY)");
        case LLAMA_KV_POLICY_ERR_SEQ:
            throw py::value_error(msg + "sequence id out of range (LLAMA_KV_POLICY_ERR_SEQ)");
        case LLAMA_KV_POLICY_ERR_CAPACITY:
            throw std::runtime_error(msg + "output buffer too small (LLAMA_KV_POLICY_ERR_CAPACITY)");
        case LLAMA_KV_POLICY_ERR_SHIFT:
            throw py::value_error(msg + "this model's positions cannot be shifted (learned absolute "
                                  "positions, multi-position RoPE, or a quantized K that llama.cpp stores "
                                  "without its rotation; LLAMA_KV_POLICY_ERR_SHIFT)");
        case LLAMA_KV_POLICY_ERR_STATE:
            throw std::runtime_error(msg + "not possible in the cache's current state (LLAMA_KV_POLICY_ERR_STATE)");
        case LLAMA_KV_POLICY_ERR_SHARED:
            throw py::value_error(msg + "a cell that would move is shared with another sequence "
                                  "(LLAMA_KV_POLICY_ERR_SHARED)");
        default:
            throw std::runtime_error(msg + "error code " + std::to_string(rc));
    }
}

// the kind and every row of llama-kv-policy-settings.def, each as its C type
py::dict params_to_dict(const llama_kv_policy_params & p) {
    py::dict d;
    d["kind"] = p.kind;
#define LLAMA_KV_SETTING(name, ...) d[#name] = p.name;
#include "llama-kv-policy-settings.def"
#undef LLAMA_KV_SETTING
    return d;
}

const char * type_name(int32_t type) {
    switch (type) {
        case LLAMA_KV_SETTING_INT:   return "int";
        case LLAMA_KV_SETTING_FLOAT: return "float";
        case LLAMA_KV_SETTING_BOOL:  return "bool";
        case LLAMA_KV_SETTING_ENUM:  return "enum";
    }
    return "?";
}

// a number of the C table's type as Python holds it
py::object as_py(int32_t type, double v) {
    switch (type) {
        case LLAMA_KV_SETTING_FLOAT: return py::float_(v);
        case LLAMA_KV_SETTING_BOOL:  return py::bool_(v != 0.0);
        default:                     return py::int_(static_cast<long long>(v));
    }
}

// The table (llama_kv_policy_setting_info) as a tuple of dicts.
py::tuple settings_table() {
    const int32_t n = llama_kv_policy_n_settings();
    py::tuple out(n);
    for (int32_t i = 0; i < n; ++i) {
        const llama_kv_policy_setting & s = *llama_kv_policy_setting_info(i);
        py::list choices;
        if (s.type == LLAMA_KV_SETTING_ENUM) {
            std::string all = s.choices;
            for (size_t at = 0;;) {
                const size_t bar = all.find('|', at);
                choices.append(all.substr(at, bar == std::string::npos ? std::string::npos : bar - at));
                if (bar == std::string::npos) {
                    break;
                }
                at = bar + 1;
            }
        }
        py::dict d;
        d["name"]    = s.name;
        d["type"]    = type_name(s.type);
        d["range"]   = py::make_tuple(as_py(s.type, s.min), as_py(s.type, s.max));
        d["auto"]    = s.has_auto ? as_py(s.type, s.auto_value) : py::none();
        d["default"] = as_py(s.type, s.default_value);
        d["choices"] = py::tuple(choices);
        d["help"]    = s.help;
        out[i] = d;
    }
    return out;
}

// A keyword of set_policy as the double llama_kv_policy_set_value takes: TypeError for a
// value of the wrong type (its range is the C check's)
double setting_value(const llama_kv_policy_setting & s, const py::handle & v) {
    auto wrong = [&](const char * want) {
        return py::type_error(std::string(s.name) + " must be " + want + ", got " +
                              std::string(py::str(py::type::of(v).attr("__name__"))) + " (" +
                              std::string(py::repr(v)) + ")");
    };
    switch (s.type) {
        case LLAMA_KV_SETTING_BOOL:
            try {
                return v.cast<bool>() ? 1.0 : 0.0;
            } catch (const py::cast_error &) {
                throw wrong("a bool");
            }
        case LLAMA_KV_SETTING_FLOAT:
            try {
                return v.cast<double>();
            } catch (const py::cast_error &) {
                throw wrong("a real number");
            }
        default: {  // INT, ENUM: any Python int (or object with __index__), exact below 2^53
            if (PyFloat_Check(v.ptr())) {
                throw wrong("an int");
            }
            PyObject * i = PyNumber_Index(v.ptr());
            if (i == nullptr) {
                PyErr_Clear();
                throw wrong("an int");
            }
            const py::int_ n = py::reinterpret_steal<py::int_>(i);
            const double d = PyLong_AsDouble(n.ptr());
            if (d == -1.0 && PyErr_Occurred()) {  // past the doubles: out of any range
                PyErr_Clear();
                return n < py::int_(0) ? -INFINITY : INFINITY;
            }
            return d;
        }
    }
}

void check_nonneg(int64_t v, const char * name) {
    if (v < 0 || v > INT32_MAX) {
        throw py::value_error(std::string(name) + " must be in [0, 2^31-1], got " + std::to_string(v));
    }
}

// The binding of a C call (ctx, seq_id, a number of cells) -> cells, such as
// llama_kv_policy_evict: the count comes as a Python int, so it is range-checked
// (named `count_name` in the error) before the cast to int32_t.
auto cells_call(int32_t (*fn)(llama_context *, llama_seq_id, int32_t), const char * fn_name,
                const char * count_name) {
    return [=](const py::object & ctx_obj, int32_t seq_id, int64_t count) {
        llama_context * ctx = as_ctx(ctx_obj);
        check_nonneg(count, count_name);
        return check(fn(ctx, seq_id, static_cast<int32_t>(count)), fn_name);
    };
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "a2sf native bindings: KV-cache policy configuration, scores and statistics";

    m.attr("KIND_NONE")      = static_cast<int>(LLAMA_KV_POLICY_NONE);
    m.attr("KIND_STREAMING") = static_cast<int>(LLAMA_KV_POLICY_STREAMING);
    m.attr("KIND_SCORE")     = static_cast<int>(LLAMA_KV_POLICY_SCORE);
    m.attr("KIND_RANDOM")    = static_cast<int>(LLAMA_KV_POLICY_RANDOM);

    m.attr("ERR_ARG")      = LLAMA_KV_POLICY_ERR_ARG;
    m.attr("ERR_MEMORY")   = LLAMA_KV_POLICY_ERR_MEMORY;
    m.attr("ERR_SEQ")      = LLAMA_KV_POLICY_ERR_SEQ;
    m.attr("ERR_CAPACITY") = LLAMA_KV_POLICY_ERR_CAPACITY;
    m.attr("ERR_SHIFT")    = LLAMA_KV_POLICY_ERR_SHIFT;
    m.attr("ERR_SHARED")   = LLAMA_KV_POLICY_ERR_SHARED;
    m.attr("ERR_STATE")    = LLAMA_KV_POLICY_ERR_STATE;
    m.attr("GRANULARITY_TOKEN") = static_cast<int>(LLAMA_KV_GRANULARITY_TOKEN);
    m.attr("GRANULARITY_LAYER") = static_cast<int>(LLAMA_KV_GRANULARITY_LAYER);
    m.attr("GRANULARITY_HEAD")  = static_cast<int>(LLAMA_KV_GRANULARITY_HEAD);

    m.def("default_params", []() { return params_to_dict(llama_kv_policy_default_params()); },
          "The engine's default policy parameters as a dict.");

    m.def("settings", &settings_table,
          "The engine's settings table (cpp/include/llama-kv-policy-settings.def): per field of\n"
          "llama_kv_policy_params, a dict of name, type ('int', 'float', 'bool', 'enum'), range\n"
          "(inclusive; an enum's first and last number), auto (the value that lets the engine\n"
          "choose, or None), default, choices (an enum's names, numbered from range[0]) and help.");

    // set_policy(ctx, kind, <one keyword per row of the table, default: the row's default>)
#define A2SF_PARAM(name, ...) , const py::object & name
#define A2SF_VALUE(name, ...) &name,
#define A2SF_ARG(name, ctype, type, min, max, auto_, def, ...) , py::arg(#name) = static_cast<ctype>(def)
#define LLAMA_KV_SETTING A2SF_PARAM
    m.def(
        "set_policy",
        [](const py::object & ctx_obj, int kind
#include "llama-kv-policy-settings.def"
           ) {
#undef LLAMA_KV_SETTING
            llama_context * ctx = as_ctx(ctx_obj);
#define LLAMA_KV_SETTING A2SF_VALUE
            const py::object * values[] = {
#include "llama-kv-policy-settings.def"
            };
#undef LLAMA_KV_SETTING
            llama_kv_policy_params p = llama_kv_policy_default_params();
            p.kind = kind;
            char msg[512];
            if (llama_kv_policy_check(&p, msg, sizeof(msg)) != 0) {  // the kind
                throw py::value_error(msg);
            }
            for (int32_t i = 0; i < llama_kv_policy_n_settings(); ++i) {
                const double v = setting_value(*llama_kv_policy_setting_info(i), *values[i]);
                if (llama_kv_policy_set_value(&p, i, v, msg, sizeof(msg)) != 0) {
                    throw py::value_error(msg);
                }
            }
            check(llama_kv_policy_set(ctx, &p), "llama_kv_policy_set");
        },
        py::arg("ctx"), py::arg("kind")
#define LLAMA_KV_SETTING A2SF_ARG
#include "llama-kv-policy-settings.def"
#undef LLAMA_KV_SETTING
        ,
        "Set (or replace) the eviction policy of a context: kind, then one keyword per field of\n"
        "llama_kv_policy_params (see settings()). ValueError with the engine's message for a value\n"
        "out of range (and for layer/head granularity on an ALiBi model), TypeError for a wrong type.");
#undef A2SF_PARAM
#undef A2SF_VALUE
#undef A2SF_ARG

    m.def(
        "get_policy",
        [](const py::object & ctx_obj) {
            llama_context * ctx = as_ctx(ctx_obj);
            llama_kv_policy_params p = llama_kv_policy_default_params();
            check(llama_kv_policy_get(ctx, &p), "llama_kv_policy_get");
            return params_to_dict(p);
        },
        py::arg("ctx"), "The context's current policy parameters as a dict.");

    m.def(
        "n_layers", [](const py::object & ctx_obj) { return llama_kv_policy_n_layers(as_ctx(ctx_obj)); },
        py::arg("ctx"), "Number of KV-cache layers that carry scores (0 without a plain KV cache).");

    m.def(
        "scored_layers",
        [](const py::object & ctx_obj) {
            llama_context * ctx = as_ctx(ctx_obj);
            const int32_t n = check(llama_kv_policy_scored_layer_ids(ctx, 0, nullptr), "llama_kv_policy_scored_layer_ids");
            py::array_t<int32_t> ids(n);
            check(llama_kv_policy_scored_layer_ids(ctx, n, ids.mutable_data()), "llama_kv_policy_scored_layer_ids");
            return ids;
        },
        py::arg("ctx"), "Model layer index of each scored layer (the rows of scores()); iSWA models: the global layers.");

    m.def(
        "n_cells",
        [](const py::object & ctx_obj, int32_t seq_id) {
            llama_context * ctx = as_ctx(ctx_obj);
            return check(llama_kv_policy_n_cells(ctx, seq_id), "llama_kv_policy_n_cells");
        },
        py::arg("ctx"), py::arg("seq_id") = 0, "Number of cells currently holding seq_id.");

    m.def(
        "scores",
        [](const py::object & ctx_obj, int32_t seq_id) {
            llama_context * ctx = as_ctx(ctx_obj);
            const int32_t n_layers = std::max<int32_t>(0, llama_kv_policy_n_layers(ctx));
            const int32_t n = check(llama_kv_policy_n_cells(ctx, seq_id), "llama_kv_policy_n_cells");

            py::array_t<int32_t> pos(n);
            py::array_t<int32_t> cells(n);
            py::array_t<float>   scores({static_cast<py::ssize_t>(n_layers), static_cast<py::ssize_t>(n)});

            const int32_t got = check(
                llama_kv_policy_scores(ctx, seq_id, n, pos.mutable_data(), cells.mutable_data(),
                                       n_layers > 0 ? scores.mutable_data() : nullptr),
                "llama_kv_policy_scores");
            if (got != n) {
                throw std::runtime_error("llama_kv_policy_scores: wrote " + std::to_string(got) +
                                         " cells, expected " + std::to_string(n));
            }
            return py::make_tuple(pos, cells, scores);
        },
        py::arg("ctx"), py::arg("seq_id") = 0,
        "(positions int32[n], cells int32[n], scores float32[n_layers, n]) of the cells of seq_id,\n"
        "ordered by position.");

    m.def(
        "stats",
        [](const py::object & ctx_obj) {
            llama_context * ctx = as_ctx(ctx_obj);
            llama_kv_policy_stats s{};
            check(llama_kv_policy_get_stats(ctx, &s), "llama_kv_policy_get_stats");
            py::dict d;
            d["n_evictions"]     = s.n_evictions;
            d["n_cells_evicted"] = s.n_cells_evicted;
            d["n_cells_used"]    = s.n_cells_used;
            d["t_evict_us"]      = s.t_evict_us;
            d["n_compactions"]   = s.n_compactions;
            d["t_compact_us"]    = s.t_compact_us;
            d["n_move_events"]   = s.n_move_events;
            d["n_bytes_moved"]   = s.n_bytes_moved;
            d["t_move_us"]       = s.t_move_us;
            d["n_lazy_flushes"]  = s.n_lazy_flushes;
            d["n_lazy_queries"]  = s.n_lazy_queries;
            d["t_lazy_us"]       = s.t_lazy_us;
            d["n_host_moves"]    = s.n_host_moves;
            return d;
        },
        py::arg("ctx"), "Eviction statistics of the context.");

    m.def(
        "reset_stats", [](const py::object & ctx_obj) { llama_kv_policy_reset_stats(as_ctx(ctx_obj)); },
        py::arg("ctx"), "Zero the eviction statistics.");

    m.def(
        "auto_decode_unfused", []() { return llama_kv_policy_auto_decode_unfused(); },
        "Whether decode_scoring \"auto\" scores a decode step of a host cache with llama.cpp's\n"
        "unfused attention on this CPU (ggml's CPU backend runs AVX-512 kernels) rather than\n"
        "with the flash-attention kernel plus a K*q product.");

    m.def(
        "state_error", []() { return std::string(llama_kv_policy_state_error()); },
        "Why the last failed state restore on this thread failed (\"\" if it did not fail\n"
        "because of the a2sf part of the state).");

    m.def(
        "state_hash", [](py::buffer data) {
            const py::buffer_info b = data.request();
            if (!PyBuffer_IsContiguous(b.view(), 'C')) {
                throw py::value_error("state_hash: the buffer is not contiguous");
            }
            const size_t n = (size_t) b.size*(size_t) b.itemsize;
            py::gil_scoped_release nogil;
            return llama_kv_policy_state_hash(b.ptr, n);
        },
        py::arg("data"),
        "The 64-bit hash of a2sf's state checksum (llama_kv_policy_state_hash) of a contiguous\n"
        "buffer's bytes (bytes, bytearray, numpy array), without copying it.");

    m.def(
        "evict", cells_call(llama_kv_policy_evict, "llama_kv_policy_evict", "n_free"),
        py::arg("ctx"), py::arg("seq_id"), py::arg("n_free"),
        "Evict n_free cells of seq_id now by the policy's ranking; returns the number freed.");

    m.def(
        "compact",
        [](const py::object & ctx_obj, int32_t seq_id) {
            return check(llama_kv_policy_compact(as_ctx(ctx_obj), seq_id), "llama_kv_policy_compact");
        },
        py::arg("ctx"), py::arg("seq_id") = 0,
        "Renumber the cells of seq_id to positions 0..n-1 (K re-rotated); returns n, the\n"
        "position of the sequence's next token (iSWA memory: start - n..start - 1 when the\n"
        "sliding window holds more tokens than the global cache; returns start).");

    m.attr("POSITIONS_CACHE")    = static_cast<int>(LLAMA_KV_POSITIONS_CACHE);
    m.attr("POSITIONS_TRAINING") = static_cast<int>(LLAMA_KV_POSITIONS_TRAINING);
    m.attr("POSITIONS_ABSOLUTE") = static_cast<int>(LLAMA_KV_POSITIONS_ABSOLUTE);

    m.def(
        "default_positions",
        [](const py::object & ctx_obj) {
            return check(llama_kv_policy_default_positions(as_ctx(ctx_obj)), "llama_kv_policy_default_positions");
        },
        py::arg("ctx"),
        "The positions mode (POSITIONS_*) for the context's policy when none is given: absolute where\n"
        "compact() cannot run, training per layer or head, else cache.");

    m.def(
        "wants_compaction",
        [](const py::object & ctx_obj, int32_t seq_id, int mode, int64_t next_pos, int64_t n_new,
           int64_t n_ctx_train, int64_t n_cells, int64_t next_after, int64_t n_unheld) {
            llama_context * ctx = as_ctx(ctx_obj);
            check_nonneg(next_pos, "next_pos");
            check_nonneg(n_new, "n_new");
            const llama_kv_positions_state state = {mode, n_ctx_train, n_cells, next_after, n_unheld};
            return check(llama_kv_policy_wants_compaction(ctx, seq_id, &state, static_cast<llama_pos>(next_pos),
                                                          static_cast<int32_t>(n_new)),
                         "llama_kv_policy_wants_compaction") != 0;
        },
        py::arg("ctx"), py::arg("seq_id"), py::arg("mode"), py::arg("next_pos"), py::arg("n_new"),
        py::arg("n_ctx_train"), py::arg("n_cells"), py::arg("next_after") = 0, py::arg("n_unheld") = 0,
        "Whether to compact seq_id before evaluating n_new tokens from cache position next_pos on\n"
        "(llama_kv_policy_wants_compaction: the rule llama-server follows too).");

    m.def(
        "head_scores",
        [](const py::object & ctx_obj, int32_t seq_id) {
            llama_context * ctx = as_ctx(ctx_obj);
            const int32_t n_layers = std::max<int32_t>(0, llama_kv_policy_n_layers(ctx));
            const int32_t n_hkv    = std::max<int32_t>(0, llama_kv_policy_n_head_kv(ctx));
            const int32_t n = check(llama_kv_policy_n_cells(ctx, seq_id), "llama_kv_policy_n_cells");
            const std::vector<py::ssize_t> shape = { n_layers, n_hkv, n };
            py::array_t<int32_t> pos(shape);
            py::array_t<float>   scores(shape);
            const bool any = n_layers > 0 && n_hkv > 0;
            const int32_t got = check(
                llama_kv_policy_head_scores(ctx, seq_id, n, any ? pos.mutable_data() : nullptr,
                                            any ? scores.mutable_data() : nullptr),
                "llama_kv_policy_head_scores");
            if (got != n) {
                throw std::runtime_error("llama_kv_policy_head_scores: wrote " + std::to_string(got) +
                                         " cells, expected " + std::to_string(n));
            }
            return py::make_tuple(pos, scores);
        },
        py::arg("ctx"), py::arg("seq_id") = 0,
        "(positions int32[n_layers, n_head_kv, n], scores float32[n_layers, n_head_kv, n]): what each\n"
        "(layer, KV head) holds in each cell of seq_id (cells in the order of scores()).");

    m.def(
        "compress", cells_call(llama_kv_policy_compress, "llama_kv_policy_compress", "n_keep"),
        py::arg("ctx"), py::arg("seq_id"), py::arg("n_keep"),
        "Evict seq_id down to n_keep cells by the policy (its granularity) and move the kept cells\n"
        "to the front of the cache; returns the cells it holds.");
}
