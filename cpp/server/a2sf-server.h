// a2sf inside llama.cpp's llama-server: the --kv-* flags, the policy on the
// server's context, eviction instead of context shift, position compaction per
// slot, and per-slot counters for /slots.
//
// Compiled into llama-common only with -DA2SF_BUILD_SERVER=ON; the hooks of
// cpp/patches/0010-* (common/arg.cpp, tools/server/server.cpp,
// tools/server/server-context.cpp) call these functions. All state is global:
// llama-server has one target context, and runs its slots from one thread.
#pragma once

#include "llama.h"

#include <cstdint>
#include <string>

struct common_params;
struct common_params_context;

// common_params_parser_init: add --kv-policy, --kv-sink, ... (LLAMA_EXAMPLE_SERVER only).
// Handlers only record the strings; a2sf_server_check validates them.
void a2sf_server_add_args(common_params_context & ctx_arg);

// After the command line is parsed: validate the --kv-* values as python/a2sf/policies.py
// does, refuse what eviction cannot serve (speculative decoding), lower n_batch/n_ubatch
// so that a batch fits beside a slot's protected cells. Prints one "error: ..." line and
// returns false on a bad value.
bool a2sf_server_check(common_params & params);

// Right after the server created its context: set the policy on it. false: the error is logged.
bool a2sf_server_attach(llama_context * ctx, const common_params & params);

// Whether a policy evicts (kind other than none): context shift and the
// "context size exceeded" checks are then replaced by eviction, and each request
// re-evaluates its prompt (the cached cells' scores hold the previous request's queries).
bool a2sf_server_evicts();

// The prompt loop of a slot stops adding tokens at this token index: the end of the
// slot's current prompt chunk (INT32_MAX without a policy).
int32_t a2sf_server_chunk_end(int32_t n_tokens);

// server_batch::render, for each token of the view it renders: the cache position of a
// slot's token at token index pos (positions compaction); counts the view's tokens per slot.
void      a2sf_server_batch_begin();
llama_pos a2sf_server_pos(int32_t seq_id, llama_pos pos);

// Around each llama_process(DECODE) of the rendered view: per-slot eviction counters,
// and compaction of the sequences that evicted (positions cache/training).
void a2sf_server_before_decode(llama_context * ctx);
void a2sf_server_after_decode(llama_context * ctx);

// The server removed every cell of seq_id from position p0 on (p0 <= 0: all): a new
// conversation starts at token index p0, positions are token indices again.
void a2sf_server_seq_rm(int32_t seq_id, llama_pos p0);

// {"policy": ..., "cells": n, "evictions": e, "cells_evicted": c, "compactions": k,
//  "position_offset": o} for /slots (JSON text; "null" without a policy).
std::string a2sf_server_slot_json(int32_t seq_id);
