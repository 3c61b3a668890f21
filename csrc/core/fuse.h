// fuse.h - fused IVL logits: out[i] = base[i] + alpha * w[i] * value[map[i]].
//
// Usage (one decode step; base/value are the float* from llama_get_logits_ith):
//
//     #include "core/fuse.h"
//
//     std::vector<float> fused(n_base);
//     ivl::fuse_logits(fused.data(), base, n_base, value, n_value,
//                      token_map,       // int32[n_base] in [-1, n_value), or nullptr = identity
//                      0.8f,            // alpha
//                      token_weights);  // float[n_base], or nullptr = all 1
//     // in place works too: ivl::fuse_logits(base, base, n_base, ...)
//
//     ivl::set_simd_level("scalar");  // tests/benchmarks only; "auto" = best for this CPU
//
// Semantics, identical at every SIMD level:
//   - map[i] == -1, alpha == 0 or w[i] == 0: a zero contribution, out[i] == base[i] exactly
//     (even where the value logit is +-inf); alpha == 0 does not read value at all.
//   - an infinite base logit is kept as is (-inf stays -inf); a finite base logit plus an
//     infinite contribution is that infinity.
//   - NaN in base, or in a value logit that a base token maps to: std::invalid_argument
//     "NaN in base logits at index i" / "NaN in value logits at index j".
//   - a map entry outside [-1, n_value): std::invalid_argument naming the index.
// The fast path is one pass: a vector FMA (identity) or masked gather (mapped), with the NaN
// and map checks folded in as an accumulated mask; indexes are found on the slow path only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ivl {

// Levels this CPU can run, best last: "scalar" first, then "neon" or "avx2", "avx512".
std::vector<std::string> available_simd_levels();
// The active level ("avx512" | "avx2" | "neon" | "scalar").
std::string simd_level();
// Force a level for tests and benchmarks; "auto" = the best available.
// Throws std::invalid_argument for an unknown or unsupported level.
void set_simd_level(const std::string& level);

void fuse_logits(float* out, const float* base_logits, int64_t n_base,
                 const float* value_logits, int64_t n_value,
                 const int32_t* token_map, float alpha, const float* token_weights);

}  // namespace ivl
