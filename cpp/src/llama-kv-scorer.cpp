// a2sf: the scorers (llama-kv-scorer.h) and the factory that picks one for a policy.

#include "llama-kv-scorer.h"

#include "llama-kv-score.h"

#include <algorithm>
#include <deque>

namespace {

// a cell's score summed over a group's units, in double: the mean divides this sum,
// so both scorers round once, to float, at the end
double group_score_sum(const llama_kv_scorer_inputs & in, const std::vector<uint32_t> & group, uint32_t cell) {
    double sum = 0.0;
    for (uint32_t unit : group) {
        const uint32_t layer = unit/in.n_head_kv;
        const uint32_t head  = unit%in.n_head_kv;
        const auto & layer_scores = in.scores[layer];
        if (head*in.kv_size + cell < layer_scores.size()) { // a layer with fewer KV heads
            sum += layer_scores[head*in.kv_size + cell];
        }
    }
    return sum;
}

} // namespace

void llama_kv_scorer_accumulated::rank(const llama_kv_scorer_inputs & in, const std::vector<uint32_t> & group,
                                       std::vector<kv_cell_rank> & cand) {
    for (auto & c : cand) {
        c.rank = (float) group_score_sum(in, group, c.cell);
    }
}

void llama_kv_scorer_mean::rank(const llama_kv_scorer_inputs & in, const std::vector<uint32_t> & group,
                                std::vector<kv_cell_rank> & cand) {
    for (auto & c : cand) {
        const double sum = group_score_sum(in, group, c.cell);
        if (in.units == nullptr || group.empty()) {
            c.rank = (float) sum;
            continue;
        }
        // every unit of a group holds the same token, born when the group's first unit says
        const int64_t born   = in.units->born[in.units->at(in.strm, group[0], c.cell)];
        const double  n_seen = std::max<double>(1.0, (double) (in.n_queries - born));
        c.rank = (float) (sum/n_seen);
    }
}

void llama_kv_scorer_position::rank(const llama_kv_scorer_inputs & /*in*/, const std::vector<uint32_t> & /*group*/,
                                    std::vector<kv_cell_rank> & cand) {
    for (auto & c : cand) {
        c.rank = (float) c.pos;
    }
}

void llama_kv_scorer_random::rank(const llama_kv_scorer_inputs & /*in*/, const std::vector<uint32_t> & /*group*/,
                                  std::vector<kv_cell_rank> & cand) {
    std::uniform_real_distribution<float> dist(0.0f, 1.0f);
    for (auto & c : cand) {
        c.rank = dist(rng);
    }
}

// The window maximum in one pass: a deque of candidate indices whose ranks decrease, so
// its front is the maximum of the window ending at the current candidate. cand is ordered
// by position and holds each position once, so the window is a run of candidates.
void llama_kv_scorer_span_pooled::rank(const llama_kv_scorer_inputs & in, const std::vector<uint32_t> & group,
                                       std::vector<kv_cell_rank> & cand) {
    inner->rank(in, group, cand);
    if (k <= 1 || cand.size() < 2) {
        return;
    }
    std::vector<float> pooled(cand.size());
    std::deque<size_t> best;
    for (size_t i = 0; i < cand.size(); ++i) {
        while (!best.empty() && cand[best.back()].rank <= cand[i].rank) {
            best.pop_back();
        }
        best.push_back(i);
        while (cand[best.front()].pos < cand[i].pos - (k - 1)) {
            best.pop_front();
        }
        pooled[i] = std::max(cand[i].rank, weight*cand[best.front()].rank);
    }
    for (size_t i = 0; i < cand.size(); ++i) {
        cand[i].rank = pooled[i];
    }
}

std::unique_ptr<llama_kv_scorer> llama_kv_span_pooled(std::unique_ptr<llama_kv_scorer> inner, int32_t k, float weight) {
    if (k <= 1) {
        return inner;
    }
    return std::make_unique<llama_kv_scorer_span_pooled>(std::move(inner), k, weight);
}

// The registry: one line per scorer. The settings the graph reads (forgetting factor,
// value_aware) need no scorer of their own; pooling applies to the score-ranked ones.
std::unique_ptr<llama_kv_scorer> llama_kv_make_scorer(const llama_kv_policy_cfg & cfg, std::mt19937 & rng) {
    switch (cfg.kind()) {
        case LLAMA_KV_POLICY_SCORE:
            if (cfg.params.mean_attention) {
                return llama_kv_span_pooled(std::make_unique<llama_kv_scorer_mean>(), cfg.params.pool_kernel, cfg.params.pool_weight);
            }
            return llama_kv_span_pooled(std::make_unique<llama_kv_scorer_accumulated>(), cfg.params.pool_kernel, cfg.params.pool_weight);
        case LLAMA_KV_POLICY_RANDOM:
            return std::make_unique<llama_kv_scorer_random>(rng);
        case LLAMA_KV_POLICY_NONE: // never evicts (callers return early); ranks as streaming would
        case LLAMA_KV_POLICY_STREAMING:
            break;
    }
    return std::make_unique<llama_kv_scorer_position>();
}
