// fuse_terms.h - a base model composed with N terms at decode time, in one sweep of the
// vocabulary: fused[i] = base[i] + sum_j weight_j * token_weights_j[i] * T_j(z_j)[map_j[i]],
// then an optional plausibility mask, then (fuse_terms_and_sample) the sampler chain.
//
// Usage (one decode step; the logits are the float* from llama_get_logits_ith):
//
//     #include "core/fuse_terms.h"
//
//     // proxy-tuning / EFT: base + (expert - anti-expert) in log-probabilities
//     const ivl::FuseTerm terms[] = {
//         {expert, n_expert, expert_map, expert_weights, 1.0f, ivl::TermTransform::kLogSoftmax},
//         {anti, n_anti, anti_map, anti_weights, -1.0f, ivl::TermTransform::kLogSoftmax},
//         {value, n_value, value_map, nullptr, 0.8f, ivl::TermTransform::kRaw},  // an IVL value net
//     };
//     std::vector<float> fused(n_base);
//     ivl::fuse_terms(fused.data(), base, n_base, terms, 3, /*mask_alpha=*/0.1f);
//     // or fuse and sample in one sweep (scratch: n_base floats, overwritten)
//     int32_t token = ivl::fuse_terms_and_sample(sampler, scratch, base, n_base, terms, 3, 0.0f);
//
// Terms (at most kMaxFuseTerms):
//   - logits z_j (n_logits of them), token_map int32[n_base] in [-1, n_logits) or nullptr =
//     identity (then n_logits == n_base), token_weights float[n_base] in [0, 1] or nullptr =
//     all 1 (not re-checked here: the binding and the map loader check them), weight any
//     finite float (negative: an anti-expert).
//   - kRaw: z as is (IVL value nets). kLogSoftmax: z - logsumexp(z) over the term's whole
//     vocabulary of n_logits, mapped or not (a probability distribution of its own model,
//     not renormalised over the tokens the base maps to); computed once per call in double
//     (max pass, then a SIMD sum of float exps).
// Semantics, identical at every SIMD level (results within float rounding of each other:
// vector levels use FMA and their own exp):
//   - the terms are added in order to the base: acc = base; acc += c * T(z)[j] per term, with
//     c = weight * token_weights[i]. map -1, weight 0 or c == 0: a zero contribution (even
//     where the term logit is +-inf); weight 0 does not read the term (nor check its map).
//   - an infinite base logit is kept as is (-inf stays -inf). For a finite base, a -inf
//     contribution wins: the result is -inf whenever some term contributes -inf (or an
//     earlier overflow to +inf meets one), +inf when only +inf contributions occur.
//   - NaN in base, or in a term logit that is used (a kRaw logit some base token maps to;
//     any logit of a kLogSoftmax term): std::invalid_argument "NaN in base logits at index i"
//     / "NaN in term j logits at index k". A kLogSoftmax term with a +inf logit or with every
//     logit -inf has no log-softmax: std::invalid_argument naming the term.
//   - a map entry outside [-1, n_logits): std::invalid_argument "term j: token_map[i] = ...".
//   - mask_alpha a in (0, 1] (contrastive decoding's plausibility constraint, Li et al. 2023):
//     tokens whose *base* probability is below a * the best base probability, i.e.
//     base[i] < max(base) + log(a) (compared exactly, in double), are -inf in the output.
//     0 disables the mask; outside [0, 1] (or NaN) is std::invalid_argument. The terms are
//     still computed (and checked) for masked tokens.
//   - out must not alias base (the base stays readable for the infinity rule).
// Work: one pass over base for its max (mask only), one or two over each kLogSoftmax term,
// then one sweep in 16 KiB chunks: copy base, add each term (gather + FMA), mask.
#pragma once

#include <cstdint>

namespace ivl {

class Sampler;

enum class TermTransform : int32_t { kRaw = 0, kLogSoftmax = 1 };

struct FuseTerm {
    const float* logits;           // n_logits
    int64_t n_logits;
    const int32_t* token_map;      // n_base entries in [-1, n_logits), or null = identity
    const float* token_weights;    // n_base in [0, 1], or null = all 1
    float weight;                  // finite; 0 = the term is skipped
    TermTransform transform;
};

constexpr int kMaxFuseTerms = 16;

void fuse_terms(float* out, const float* base_logits, int64_t n_base, const FuseTerm* terms,
                int n_terms, float mask_alpha);

// One decode step: fuse_terms into `scratch` (n_base floats), then sample it: the candidates
// and draws of fuse_terms-then-sample. Without the mask (and without penalties to apply),
// only the 32-token blocks that can hold a survivor of the chain are fused
// (Sampler::sample_bounded): per block, the base's max plus each term's reach (a mapped
// term: its whole vocabulary's range; an identity term: the block's own) bounds every fused
// logit from above, and the block's best from below. That reads base and each identity
// term once, a mapped term's logits once (its map and weights only in the fused blocks),
// and gathers a few % of the vocabulary. So `scratch` is left fused in part, and a map entry
// outside [-1, n_logits) raises only when its block is fused (the map loader validated the
// Engine's maps; fuse_terms checks every entry). NaN rules as fuse_terms: a NaN anywhere in
// base or a term sends the step through the full sweep, which raises where fuse_terms does.
int32_t fuse_terms_and_sample(Sampler& sampler, float* scratch, const float* base_logits,
                              int64_t n_base, const FuseTerm* terms, int n_terms,
                              float mask_alpha);

}  // namespace ivl
