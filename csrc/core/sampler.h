// sampler.h - llama.cpp-style sampler chain over a full vocabulary, without sorting it.
//
// Usage (one decode step):
//
//     #include "core/sampler.h"
//
//     ivl::SamplerParams params;          // defaults = SamplingConfig's
//     params.temperature = 0.8f;
//     params.top_k = 40;
//     params.seed = 1234;
//     ivl::Sampler sampler(params);
//
//     int32_t token = sampler.sample(logits, n_vocab);          // logits not modified
//     sampler.accept(token);                                    // feeds the penalties window
//     // hot path: fuse into a scratch buffer and sample it (scratch is overwritten)
//     token = ivl::fuse_and_sample(sampler, scratch, base, n_base, value, n_value,
//                                  token_map, alpha, token_weights);
//
// The chain, in order: penalties -> top-k -> temperature -> top-p -> min-p -> draw.
// temperature == 0 is greedy: penalties -> argmax (ties -> lowest id), no RNG.
// Each step is a SamplerStep with apply() and optional accept()/reset(); a SamplerChain is
// itself a step. Steps see a CandidateSet that starts *dense* (the whole logits array, not
// copied) and becomes *sparse* (a small vector of candidates) at the first truncation:
//   - top-k on the dense array is one SIMD scan against a running threshold + a k-heap;
//   - without top-k, tokens whose probability is below e^-50 / n_vocab of the best token are
//     dropped before the softmax (their total mass is under 2^-53 of it: a 53-bit uniform
//     cannot reach them);
//   - without top-k but with min-p (> e^-9), the "nucleus path": one read of the dense array
//     (NucleusScan: running max, block maxes, tokens within e^-10 of the best) and no exp
//     outside that band. min-p's survivors lie inside it; top-p's cut among them needs the
//     total mass, which is bounded (every other token is at most its 32-token block's max)
//     and decided when both ends of the bound give the same cut, else summed exactly (a float
//     exp per token, within 2e-5 of the double total), else the chain runs on the array
//     (a cut within ~1e-5 of the boundary). Same tables as the chain; survivors are drawn in
//     canonical order;
//   - with bounds per 32-token block from the caller (sample_bounded: fuse_terms_and_sample),
//     greedy, top-k and the nucleus path fill and read only the blocks that can reach the
//     chain's survivors; the others count in top-p's total through their bound, or are
//     filled when that cannot decide the cut;
//   - top-p selects an exact nucleus by partial sorts of growing prefixes (64, 256, ...),
//     never a full sort of the vocabulary.
// Softmax is computed in double with the max subtracted. Draws use std::mt19937_64 (fully
// specified by the standard) and a uniform double built from its top 53 bits, over
// candidates in a canonical order, so a seed gives the same tokens on every platform.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <utility>
#include <vector>

#include "candidates.h"

namespace ivl {

struct SamplerParams {
    float temperature = 0.8f;
    int32_t top_k = 40;            // 0 disables
    float top_p = 0.95f;           // 1 disables
    float min_p = 0.05f;           // 0 disables
    float repeat_penalty = 1.0f;   // 1 disables
    int32_t repeat_last_n = 64;    // 0 disables all penalties
    float presence_penalty = 0.0f;
    float frequency_penalty = 0.0f;
    uint64_t seed = 0;
};

// What the steps work on. Dense: `logits` holds all n_vocab logits (ids = indices) and may
// be edited in place (penalties). Sparse: `items` holds the surviving candidates.
struct CandidateSet {
    float* logits = nullptr;
    int64_t n_vocab = 0;
    bool dense = true;
    std::vector<Candidate> items;
    bool sorted = false;      // items in canonical order (candidate_before)
    int32_t selected = -1;    // set by the final (draw/greedy) step

    // Dense -> sparse, keeping tokens with logit >= max - below_max (never -inf).
    // Throws std::invalid_argument when every logit is -inf.
    void make_sparse(double below_max);
};

class SamplerStep {
public:
    virtual ~SamplerStep() = default;
    virtual void apply(CandidateSet& candidates) = 0;
    virtual void accept(int32_t /*token*/) {}
    virtual void reset() {}
};

class SamplerChain : public SamplerStep {
public:
    void add(std::unique_ptr<SamplerStep> step) { steps_.push_back(std::move(step)); }
    void apply(CandidateSet& candidates) override { apply_from(candidates, 0); }
    void apply_from(CandidateSet& candidates, size_t first_step);
    void accept(int32_t token) override;
    void reset() override;

private:
    std::vector<std::unique_ptr<SamplerStep>> steps_;
};

class PenaltiesStep;

// The one-read scan behind the nucleus path (see Sampler): the running max, each block's max
// (detail::kScanBlock floats) and every token within `below_max` of the running max, fed in
// consecutive ranges. Every token at or above (final max - below_max) ends up in `items`
// (a running max only lowers the bar), and a token left out is at most its block's max.
struct NucleusScan {
    void begin(int64_t n_vocab, double below_max);
    void scan(const float* logits, int64_t i0, int64_t i1);  // i0 a multiple of kScanBlock

    double below_max = 0.0;
    float top = 0.0f;
    std::vector<float> block_max;
    std::vector<uint8_t> scanned;  // per block: scan() read it (else block_max is a bound)
    std::vector<Candidate> items;
};

class Sampler {
public:
    explicit Sampler(const SamplerParams& params);  // throws std::invalid_argument
    ~Sampler();

    const SamplerParams& params() const { return params_; }
    bool greedy() const { return params_.temperature == 0.0f; }

    // Applies the chain and draws; does not accept. `logits` is not modified (copied only
    // when the penalties must edit it). Throws on NaN or when every logit is -inf.
    int32_t sample(const float* logits, int64_t n_vocab);
    // Same, but `logits` is scratch the penalties may edit in place; no NaN check (the
    // fuse already did it).
    int32_t sample_in_place(float* logits, int64_t n_vocab);
    void accept(int32_t token);
    void reset();  // clears the penalty history and reseeds
    // Candidates after the chain (without the draw) and their probabilities, in canonical
    // order (for tests and inspection). Greedy: the argmax with probability 1.
    std::vector<std::pair<int32_t, float>> probs(const float* logits, int64_t n_vocab);
    // The hot path of fuse_and_sample / fuse_terms_and_sample: `fill(i0, i1)` writes
    // logits[i0..i1) (NaN-free; it throws otherwise), called on consecutive ranges from 0 to
    // n_vocab. Without penalties to apply, greedy and top-k chains consume each 16 KiB chunk
    // while it is still in L1 (argmax or the top-k heap); otherwise one fill(0, n_vocab),
    // then the chain. Either way: the candidates and draws of fill-then-sample_in_place.
    int32_t sample_filled(float* logits, int64_t n_vocab,
                          const std::function<void(int64_t, int64_t)>& fill);
    // The same with bounds (fuse_terms_and_sample): `bound(hi, lo)` writes, per block of
    // detail::kScanBlock logits, hi[b] >= every logit the fill will write in block b and
    // lo[b] <= the largest of them (-inf: unknown), and returns true; false means no bounds
    // (then it is sample_filled). Greedy, top-k and the nucleus path then fill only the blocks
    // whose hi reaches a bar that the lo's guarantee (the k-th best lo; the best lo, less the
    // nucleus band): a block below it holds no token the chain can keep. fill() is called on
    // block-aligned ranges, ascending, and once more for the rest when top-p's total is needed
    // exactly. Same candidates and draws as fill-then-sample_in_place; `logits` is left filled
    // in part.
    int32_t sample_bounded(float* logits, int64_t n_vocab,
                           const std::function<bool(float*, float*)>& bound,
                           const std::function<void(int64_t, int64_t)>& fill);

private:
    enum class Nucleus { kDone, kNeedTotal, kChain };
    // The chain's result from a finished scan: cs.items = the survivors of top-p and min-p in
    // canonical order, and kDone. Top-p's cut needs the total mass: bounded from the block
    // maxes (cheap_bound_first), then summed exactly over the scanned blocks (float exps,
    // within kBandSlack) with the others bounded by their block max. kNeedTotal: undecided
    // while some blocks are unscanned; kChain: undecided with all scanned (then the caller
    // runs the chain on the dense, filled array).
    Nucleus finish_nucleus(CandidateSet& cs, bool cheap_bound_first);
    // The nucleus path's end once the scan is done: finish_nucleus; if undecided,
    // fill_rest() (fill and scan what was skipped) and the exact total; else the chain.
    void finish_nucleus_or_chain(CandidateSet& cs, bool cheap_bound_first,
                                 const std::function<void()>& fill_rest);
    int32_t sample_filled_locked(float* logits, int64_t n_vocab,
                                 const std::function<void(int64_t, int64_t)>& fill);
    // The chain without the draw: candidates_ holds the survivors.
    void truncate(float* logits, int64_t n_vocab);
    void reset_candidates(float* logits, int64_t n_vocab);
    const float* editable_copy(const float* logits, int64_t n_vocab, bool& copied);
    int32_t run(float* logits, int64_t n_vocab);

    SamplerParams params_;
    SamplerChain filters_;             // penalties ... min-p
    std::unique_ptr<SamplerStep> draw_;  // dist or greedy
    PenaltiesStep* penalties_ = nullptr;  // owned by filters_
    std::vector<float> scratch_;
    CandidateSet candidates_;
    bool nucleus_ = false;
    NucleusScan nucleus_scan_;
    std::vector<Candidate> bounds_;
    std::vector<double> weights_, bound_weights_;
    std::vector<float> block_hi_, block_lo_;
    std::vector<uint8_t> filled_;
    std::vector<Candidate> block_list_;
    std::mutex mutex_;
};

// One decode step: fuse_logits into `scratch` (n_base floats), then sample it. Without
// penalties to apply, the fuse runs in L1-sized chunks and each chunk is fed to the top-k
// heap (or the argmax, greedy) while still in cache: one pass over the vocabulary instead of
// two, with exactly the candidates and draws of fuse-then-sample.
int32_t fuse_and_sample(Sampler& sampler, float* scratch, const float* base_logits,
                        int64_t n_base, const float* value_logits, int64_t n_value,
                        const int32_t* token_map, float alpha, const float* token_weights);

}  // namespace ivl
