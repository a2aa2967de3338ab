// pybind11 bindings of the eviction engine's C API (cpp/include/llama-kv-policy.h).
#include <pybind11/pybind11.h>

#include "llama-kv-policy.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
    m.doc() = "a2sf native bindings: KV-cache policy configuration and scores";
}
