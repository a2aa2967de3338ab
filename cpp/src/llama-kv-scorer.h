// a2sf: scorers, the ranking half of eviction.
//
// When a sequence must give up cells, the evictor (llama-kv-evict.cpp) splits its
// (scored layer, KV head) units into groups that keep the same tokens and asks a
// scorer to rank each group's candidates; it then frees the lowest ranks. A scorer
// only ranks: what the graph accumulates per cell (forgetting factor, value norms)
// is set elsewhere, so H2O, TOVA, A2SF and VATP are one scorer over different scores.
//
// A new scorer is one class here, one line in llama_kv_make_scorer and one Python
// policy class (docs/ENGINE.md). Variants compose (llama_kv_scorer_span_pooled wraps
// any scorer) instead of adding flags to the scorers.
#pragma once

#include "llama-kv-policy-cfg.h"

#include "llama.h"

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

struct llama_kv_units;

// a candidate cell of one group of units
struct kv_cell_rank {
    uint32_t  cell;
    llama_pos pos;  // of the token the group holds in the cell
    float     rank; // evicted lowest first
};

// What a scorer may read of the stream being evicted, filled once per eviction by the evictor.
// A unit is k = layer*n_head_kv + head, layer counting the scored layers only.
struct llama_kv_scorer_inputs {
    // per scored layer: F32 [kv_size, n_head_kv] (head h of cell c at h*kv_size + c; a layer
    // with fewer KV heads is shorter); empty unless the scorer reads_scores()
    std::vector<std::vector<float>> scores;

    uint32_t n_head_kv = 1; // the largest over the scored layers
    uint32_t kv_size   = 0;
    uint32_t strm      = 0;

    const llama_kv_units * units = nullptr; // the unit map, when allocated
    int64_t n_queries = 0;                  // queries the sequence has evaluated (known with the map)
};

// Ranks the candidates of one group of units.
class llama_kv_scorer {
public:
    virtual ~llama_kv_scorer() = default;

    // whether rank() reads inputs.scores (the evictor copies them off the backend only then)
    virtual bool reads_scores() const = 0;

    // set cand[i].rank for every candidate of the group (its unit indices: group, never
    // empty when the scores are read); cand is ordered by position, one entry per position
    virtual void rank(const llama_kv_scorer_inputs & in, const std::vector<uint32_t> & group,
                      std::vector<kv_cell_rank> & cand) = 0;
};

// Accumulated attention, summed over the group's units. The graph accumulates
// S <- alpha^n S + sum_q alpha^(n-1-q) P[q] per (layer, KV head, cell), optionally weighted
// by the value's L1 norm; the choice of alpha and weights makes the method:
//   H2O  (Zhang et al., arXiv:2306.14048):  alpha = 1
//   TOVA (Oren et al., arXiv:2401.06104):   alpha = 0, only the newest query counts
//   A2SF (Jo & Shin, arXiv:2407.20485):     0 < alpha < 1
//   VATP (Guo et al., arXiv:2406.12335):    P weighted by ||v||_1
class llama_kv_scorer_accumulated : public llama_kv_scorer {
public:
    bool reads_scores() const override { return true; }
    void rank(const llama_kv_scorer_inputs & in, const std::vector<uint32_t> & group,
              std::vector<kv_cell_rank> & cand) override;
};

// Mean attention: the accumulated attention divided by the queries that saw the token
// (NVIDIA kvpress's ObservedAttentionPress). H2O's sum favours old tokens because more
// queries saw them; the mean does not. Needs the unit map (the token's birth per unit);
// without it the rank is the sum.
class llama_kv_scorer_mean : public llama_kv_scorer {
public:
    bool reads_scores() const override { return true; }
    void rank(const llama_kv_scorer_inputs & in, const std::vector<uint32_t> & group,
              std::vector<kv_cell_rank> & cand) override;
};

// Position: the oldest token goes first (StreamingLLM, Xiao et al., arXiv:2309.17453;
// its attention sinks are the evictor's n_sink, never candidates).
class llama_kv_scorer_position : public llama_kv_scorer {
public:
    bool reads_scores() const override { return false; }
    void rank(const llama_kv_scorer_inputs & in, const std::vector<uint32_t> & group,
              std::vector<kv_cell_rank> & cand) override;
};

// Random ranks: the baseline any scorer must beat. Draws from the context's RNG (seeded by
// the policy, saved with the state), so an eviction replays exactly.
class llama_kv_scorer_random : public llama_kv_scorer {
public:
    explicit llama_kv_scorer_random(std::mt19937 & rng) : rng(rng) {}

    bool reads_scores() const override { return false; }
    void rank(const llama_kv_scorer_inputs & in, const std::vector<uint32_t> & group,
              std::vector<kv_cell_rank> & cand) override;

private:
    std::mt19937 & rng;
};

// Span pooling over any scorer: a candidate ranks at least `weight` times the highest rank
// among the candidates at positions [pos - (k-1), pos]. A question attends to the start of
// a fact -- the key, "is", the first digit -- far more than to its later tokens, so ranked
// alone a number loses its tail digits and the copy breaks (per head worst: each head keeps
// a different few digits); pooled, what follows an attended token stays with it (SnapKV,
// Li et al., arXiv:2404.14469, pools scores over neighbours likewise). weight < 1 leaves
// the budget first to the tokens that score high themselves, which perplexity wants
// (docs/RETRIEVAL.md has the tables that chose the defaults).
class llama_kv_scorer_span_pooled : public llama_kv_scorer {
public:
    llama_kv_scorer_span_pooled(std::unique_ptr<llama_kv_scorer> inner, int32_t k, float weight)
        : inner(std::move(inner)), k(k), weight(weight) {}

    bool reads_scores() const override { return inner->reads_scores(); }
    void rank(const llama_kv_scorer_inputs & in, const std::vector<uint32_t> & group,
              std::vector<kv_cell_rank> & cand) override;

private:
    std::unique_ptr<llama_kv_scorer> inner;
    int32_t k;
    float   weight;
};

// inner, span-pooled over k positions with that weight (k <= 1: inner itself)
std::unique_ptr<llama_kv_scorer> llama_kv_span_pooled(std::unique_ptr<llama_kv_scorer> inner, int32_t k, float weight);

// The one place that maps a policy's settings to its scorer. rng: the context's, for
// the random baseline (it must outlive the scorer).
std::unique_ptr<llama_kv_scorer> llama_kv_make_scorer(const llama_kv_policy_cfg & cfg, std::mt19937 & rng);
