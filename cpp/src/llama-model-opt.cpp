// a2sf: OPT decoder graph (see llama-model-opt.h for the GGUF layout).
//
// Reference: transformers' OPTDecoder / OPTDecoderLayer. Attention goes
// through build_attn with the KV-cache input, so the a2sf scoring and eviction
// hooks apply unchanged. Positions are absolute (a learned table indexed by the
// token's position), so they are never shifted: llama_model_rope_type() is
// NONE for this architecture and an evicted cell just leaves the cache.

#include "llama-model-opt.h"

#include "gguf.h"

#include <stdexcept>
#include <string>

static const char * OPT_KEY_LAYER_NORM_BEFORE = "opt.layer_norm_before";
static const char * OPT_KEY_WORD_EMBED_PROJ   = "opt.word_embed_proj_dim";

void llama_model_opt::load_arch_hparams(llama_model_loader & ml) {
    ml.get_key(LLM_KV_ATTENTION_LAYERNORM_EPS, hparams.f_norm_eps);

    // OPT-specific keys are read from the GGUF metadata directly: they have no
    // llm_kv entry, and adding one would widen the patch for two values.
    const gguf_context * meta = ml.metadata;

    const int64_t kid_ln = gguf_find_key(meta, OPT_KEY_LAYER_NORM_BEFORE);
    if (kid_ln < 0 || gguf_get_kv_type(meta, kid_ln) != GGUF_TYPE_BOOL) {
        throw std::runtime_error(std::string("opt: missing or non-bool key ") + OPT_KEY_LAYER_NORM_BEFORE);
    }
    layer_norm_before = gguf_get_val_bool(meta, kid_ln);

    n_embd_proj = hparams.n_embd;
    const int64_t kid_proj = gguf_find_key(meta, OPT_KEY_WORD_EMBED_PROJ);
    if (kid_proj >= 0) {
        if (gguf_get_kv_type(meta, kid_proj) != GGUF_TYPE_UINT32) {
            throw std::runtime_error(std::string("opt: key ") + OPT_KEY_WORD_EMBED_PROJ + " is not a uint32");
        }
        n_embd_proj = gguf_get_val_u32(meta, kid_proj);
    }
    if (n_embd_proj == 0) {
        throw std::runtime_error("opt: word_embed_proj_dim is 0");
    }

    switch (hparams.n_layer()) {
        case 24: type = hparams.n_embd == 1024 ? LLM_TYPE_350M : hparams.n_embd == 2048 ? LLM_TYPE_1_3B : LLM_TYPE_UNKNOWN; break;
        case 32: type = hparams.n_embd == 4096 ? LLM_TYPE_7B   : LLM_TYPE_UNKNOWN; break;
        case 40: type = hparams.n_embd == 5120 ? LLM_TYPE_13B  : LLM_TYPE_UNKNOWN; break;
        case 48: type = hparams.n_embd == 7168 ? LLM_TYPE_30B  : LLM_TYPE_UNKNOWN; break;
        default: type = LLM_TYPE_UNKNOWN;
    }
}

void llama_model_opt::load_arch_tensors(llama_model_loader &) {
    LLAMA_LOAD_LOCALS;

    const bool has_proj = n_embd_proj != (uint32_t) n_embd;

    tok_embd = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd_proj, n_vocab}, 0);
    pos_embd = create_tensor(tn(LLM_TENSOR_POS_EMBD,   "weight"), {n_embd, n_ctx_train}, 0);

    if (has_proj) {
        project_in  = create_tensor(tn(LLM_TENSOR_OPT_PROJECT_IN,  "weight"), {n_embd_proj, n_embd}, 0);
        project_out = create_tensor(tn(LLM_TENSOR_OPT_PROJECT_OUT, "weight"), {n_embd, n_embd_proj}, 0);
    }

    // the final LayerNorm exists only in pre-LN models (transformers builds
    // none for post-LN ones); a post-LN file that has one is rejected by the
    // loader's tensor count rather than silently applying it
    if (layer_norm_before) {
        output_norm   = create_tensor(tn(LLM_TENSOR_OUTPUT_NORM, "weight"), {n_embd}, 0);
        output_norm_b = create_tensor(tn(LLM_TENSOR_OUTPUT_NORM, "bias"),   {n_embd}, 0);
    }

    output = create_tensor(tn(LLM_TENSOR_OUTPUT, "weight"), {n_embd_proj, n_vocab}, TENSOR_NOT_REQUIRED);
    if (output == nullptr) {
        // lm_head is tied to embed_tokens
        output = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd_proj, n_vocab}, TENSOR_DUPLICATED);
    }

    for (int i = 0; i < n_layer; ++i) {
        auto & layer = layers[i];

        layer.attn_norm   = create_tensor(tn(LLM_TENSOR_ATTN_NORM, "weight", i), {n_embd}, 0);
        layer.attn_norm_b = create_tensor(tn(LLM_TENSOR_ATTN_NORM, "bias",   i), {n_embd}, 0);

        layer.wq   = create_tensor(tn(LLM_TENSOR_ATTN_Q,   "weight", i), {n_embd, n_embd},     0);
        layer.wq_b = create_tensor(tn(LLM_TENSOR_ATTN_Q,   "bias",   i), {n_embd},             0);
        layer.wk   = create_tensor(tn(LLM_TENSOR_ATTN_K,   "weight", i), {n_embd, n_embd_gqa}, 0);
        layer.wk_b = create_tensor(tn(LLM_TENSOR_ATTN_K,   "bias",   i), {n_embd_gqa},         0);
        layer.wv   = create_tensor(tn(LLM_TENSOR_ATTN_V,   "weight", i), {n_embd, n_embd_gqa}, 0);
        layer.wv_b = create_tensor(tn(LLM_TENSOR_ATTN_V,   "bias",   i), {n_embd_gqa},         0);
        layer.wo   = create_tensor(tn(LLM_TENSOR_ATTN_OUT, "weight", i), {n_embd, n_embd},     0);
        layer.wo_b = create_tensor(tn(LLM_TENSOR_ATTN_OUT, "bias",   i), {n_embd},             0);

        layer.ffn_norm   = create_tensor(tn(LLM_TENSOR_FFN_NORM, "weight", i), {n_embd}, 0);
        layer.ffn_norm_b = create_tensor(tn(LLM_TENSOR_FFN_NORM, "bias",   i), {n_embd}, 0);

        layer.ffn_up     = create_tensor(tn(LLM_TENSOR_FFN_UP,   "weight", i), {n_embd, n_ff}, 0);
        layer.ffn_up_b   = create_tensor(tn(LLM_TENSOR_FFN_UP,   "bias",   i), {n_ff},         0);
        layer.ffn_down   = create_tensor(tn(LLM_TENSOR_FFN_DOWN, "weight", i), {n_ff, n_embd}, 0);
        layer.ffn_down_b = create_tensor(tn(LLM_TENSOR_FFN_DOWN, "bias",   i), {n_embd},       0);
    }
}

std::unique_ptr<llm_graph_context> llama_model_opt::build_arch_graph(const llm_graph_params & params) const {
    return std::make_unique<graph>(*this, params);
}

ggml_tensor * llama_model_opt::graph::build_inp_embd_opt(const llama_model_opt & model) const {
    if (model.project_in == nullptr) {
        return build_inp_embd(model.tok_embd);
    }

    // As build_inp_embd, but the token path is get_rows(token_embd) then
    // project_in (n_embd_proj -> n_embd). Embeddings given directly in a batch
    // are taken to be already projected (n_embd wide). No LoRA on token_embd.
    const int64_t n_embd = hparams.n_embd;

    auto inp = std::make_unique<llm_graph_input_embd>(n_embd);

    inp->tokens = ggml_new_tensor_1d(ctx0, GGML_TYPE_I32, ubatch.n_tokens);
    cb(inp->tokens, "inp_tokens", -1);
    ggml_set_input(inp->tokens);
    res->t_inp_tokens = inp->tokens;

    inp->embd = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, n_embd, ubatch.n_tokens);
    cb(inp->embd, "inp_embd", -1);
    ggml_set_input(inp->embd);

    ggml_tensor * inps[2];
    inps[0] = ggml_get_rows(ctx0, model.tok_embd, inp->tokens);
    inps[0] = build_lora_mm(model.project_in, inps[0]);
    cb(inps[0], "inp_project_in", -1);
    inps[1] = inp->embd;

    ggml_tensor * cur = ggml_build_forward_select(gf, inps, 2, ubatch.token ? 0 : 1);
    res->t_inp_embd = cur;
    cb(cur, "embd", -1);

    res->add_input(std::move(inp));
    ggml_build_forward_expand(gf, cur);

    return cur;
}

llama_model_opt::graph::graph(const llama_model_opt & model, const llm_graph_params & params) : llm_graph_context(params) {
    const int64_t n_embd_head = hparams.n_embd_head_v();

    GGML_ASSERT(n_embd_head == hparams.n_embd_head_k());

    const bool pre_ln = model.layer_norm_before;

    ggml_tensor * inpL = build_inp_embd_opt(model);

    // learned absolute positions; the converter dropped OPT's offset of 2, so
    // the table is indexed by the plain position
    ggml_tensor * inp_pos = build_inp_pos();

    auto * inp_attn = build_attn_inp_kv();

    ggml_tensor * pos = ggml_get_rows(ctx0, model.pos_embd, inp_pos);
    cb(pos, "pos_embd", -1);

    inpL = ggml_add(ctx0, inpL, pos);
    cb(inpL, "inpL", -1);

    ggml_tensor * inp_out_ids = build_inp_out_ids();

    for (int il = 0; il < n_layer; ++il) {
        const auto & layer = model.layers[il];

        ggml_tensor * cur = inpL;
        if (pre_ln) {
            cur = build_norm(cur, layer.attn_norm, layer.attn_norm_b, LLM_NORM, il);
            cb(cur, "attn_norm", il);
        }

        // self-attention: q/k/v/out with biases; OPT scales q by head_dim^-0.5
        {
            auto [Qcur, Kcur, Vcur] = build_qkv(layer, cur, n_embd_head, n_head, n_head_kv, il);

            cur = build_attn(inp_attn,
                    layer.wo, layer.wo_b, layer.wo_s,
                    Qcur, Kcur, Vcur, nullptr, nullptr, nullptr, 1.0f/sqrtf(float(n_embd_head)), il);
        }

        if (il == n_layer - 1 && inp_out_ids) {
            cur  = ggml_get_rows(ctx0,  cur, inp_out_ids);
            inpL = ggml_get_rows(ctx0, inpL, inp_out_ids);
        }

        ggml_tensor * ffn_inp = ggml_add(ctx0, cur, inpL);
        cb(ffn_inp, "ffn_inp", il);

        if (!pre_ln) {
            ffn_inp = build_norm(ffn_inp, layer.attn_norm, layer.attn_norm_b, LLM_NORM, il);
            cb(ffn_inp, "attn_post_norm", il);
        }

        // feed-forward: fc1 -> ReLU -> fc2
        cur = ffn_inp;
        if (pre_ln) {
            cur = build_norm(cur, layer.ffn_norm, layer.ffn_norm_b, LLM_NORM, il);
            cb(cur, "ffn_norm", il);
        }

        cur = build_ffn(cur,
                layer.ffn_up,   layer.ffn_up_b,   NULL,
                NULL,           NULL,             NULL,
                layer.ffn_down, layer.ffn_down_b, NULL,
                NULL,
                LLM_FFN_RELU, LLM_FFN_SEQ, il);
        cb(cur, "ffn_out", il);

        cur = ggml_add(ctx0, cur, ffn_inp);

        if (!pre_ln) {
            cur = build_norm(cur, layer.ffn_norm, layer.ffn_norm_b, LLM_NORM, il);
            cb(cur, "ffn_post_norm", il);
        }

        cur = build_cvec(cur, il);
        cb(cur, "l_out", il);

        inpL = cur;
    }

    ggml_tensor * cur = inpL;

    if (model.output_norm) {
        cur = build_norm(cur, model.output_norm, model.output_norm_b, LLM_NORM, -1);
    }
    cb(cur, "result_norm", -1);
    res->t_embd = cur;

    if (model.project_out) {
        cur = build_lora_mm(model.project_out, cur);
        cb(cur, "project_out", -1);
    }

    cur = build_lora_mm(model.output, cur, model.output_s);
    cb(cur, "result_output", -1);
    res->t_logits = cur;

    ggml_build_forward_expand(gf, cur);
}
