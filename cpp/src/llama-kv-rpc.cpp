// a2sf: register the devices of a ggml RPC server (rpc-server / ggml-rpc-server),
// so that a following model load offloads layers, their K/V and their score
// tensors to it.
//
// llama-server does this from `--rpc host:port,...` (common/arg.cpp,
// add_rpc_devices); llama-cpp-python has no such parameter, so Python calls this
// function (a2sf.Llama(..., rpc_servers=...), python/a2sf/_llama/rpc.py) before the
// model load. Only ggml's public registry API is used: the RPC backend's
// ggml_backend_rpc_add_server is looked up by name, so libllama does not link
// ggml-rpc and builds without -DGGML_RPC=ON are unchanged.

#include "llama-kv-policy.h"

#include "ggml-backend.h"

#include <cstring>
#include <mutex>

int32_t llama_kv_policy_rpc_add_server(const char * endpoint) {
    if (endpoint == nullptr || endpoint[0] == '\0' || std::strchr(endpoint, ',') != nullptr) {
        return LLAMA_KV_POLICY_ERR_ARG;
    }
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    if (rpc == nullptr) {
        return LLAMA_KV_POLICY_ERR_STATE; // built without GGML_RPC
    }
    using add_server_t = ggml_backend_reg_t (*)(const char *);
    auto add_server = (add_server_t) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server");
    if (add_server == nullptr) {
        return LLAMA_KV_POLICY_ERR_STATE;
    }

    static std::mutex mutex;
    std::lock_guard<std::mutex> lock(mutex);
    // connects (one dispatcher per endpoint) and asks for the device count; the same
    // endpoint again returns the same registry
    ggml_backend_reg_t reg = add_server(endpoint);
    if (reg == nullptr) {
        return 0; // a server without devices
    }
    bool known = false;
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        known |= ggml_backend_reg_get(i) == reg;
    }
    if (!known) {
        ggml_backend_register(reg); // its devices join ggml_backend_dev_count()
    }
    return (int32_t) ggml_backend_reg_dev_count(reg);
}
