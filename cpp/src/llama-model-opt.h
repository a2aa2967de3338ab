// a2sf: the OPT decoder (Zhang et al. 2022, arXiv 2205.01068) as a llama.cpp
// architecture ("opt").
//
// llama.cpp's own files only name the class (cpp/patches/0005-*.patch: the
// LLM_ARCH_OPT enum value, its name, two tensor names and one case in
// llama_model_mapping); everything else is in llama-model-opt.cpp.
//
// GGUF layout (written by `python -m a2sf.convert opt`):
//   token_embd      [n_embd_proj, n_vocab]   embed_tokens
//   position_embd   [n_embd, n_ctx_train]    embed_positions without OPT's 2 offset rows
//   project_in      [n_embd_proj, n_embd]    optional (word_embed_proj_dim != hidden_size)
//   project_out     [n_embd, n_embd_proj]    optional, present with project_in
//   output_norm     [n_embd] (+ bias)        pre-LN models only
//   output          [n_embd_proj, n_vocab]   optional (tied to token_embd when absent)
//   blk.N.attn_norm, ffn_norm (+ bias)       self_attn_layer_norm, final_layer_norm
//   blk.N.attn_q/k/v/output (+ bias)         q/k/v/out_proj
//   blk.N.ffn_up/ffn_down (+ bias)           fc1, fc2 (ReLU in between)
// Keys: opt.layer_norm_before (bool, required), opt.word_embed_proj_dim (u32,
// optional, defaults to embedding_length) and the usual opt.* hparams.
#pragma once

#include "models/models.h"

struct llama_model_opt : public llama_model_base {
    llama_model_opt(const struct llama_model_params & params) : llama_model_base(params) {}

    void load_arch_hparams(llama_model_loader & ml) override;
    void load_arch_tensors(llama_model_loader & ml) override;

    // do_layer_norm_before: true = pre-LN blocks (most OPT sizes), false =
    // post-LN blocks without a final LayerNorm (opt-350m)
    bool     layer_norm_before = true;
    // word_embed_proj_dim: width of token_embd and of the output head
    uint32_t n_embd_proj       = 0;

    ggml_tensor * project_in  = nullptr;
    ggml_tensor * project_out = nullptr;

    struct graph : public llm_graph_context {
        graph(const llama_model_opt & model, const llm_graph_params & params);

        // token embeddings, projected to n_embd by project_in when the model has it
        ggml_tensor * build_inp_embd_opt(const llama_model_opt & model) const;
    };

    std::unique_ptr<llm_graph_context> build_arch_graph(const llm_graph_params & params) const override;
};
