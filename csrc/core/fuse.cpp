// fuse.cpp - fuse_logits: argument checks the kernels rely on, then the active SIMD level.
#include "fuse.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace ivl {

void fuse_logits(float* out, const float* base_logits, int64_t n_base,
                 const float* value_logits, int64_t n_value,
                 const int32_t* token_map, float alpha, const float* token_weights) {
    if (n_base < 0 || n_value < 0) throw std::invalid_argument("negative vocabulary size");
    if (!std::isfinite(alpha)) throw std::invalid_argument("alpha must be a finite number");
    if (!token_map && n_value != n_base) {
        throw std::invalid_argument("without a token_map the value vocabulary (" +
                                    std::to_string(n_value) + ") must equal the base vocabulary (" +
                                    std::to_string(n_base) + ")");
    }
    const auto& kernels = detail::active_kernels();
    if (alpha == 0.0f) {  // base alone: value is not read at all
        const int64_t bad = kernels.first_nan(base_logits, n_base);
        if (bad >= 0) {
            throw std::invalid_argument("NaN in base logits at index " + std::to_string(bad));
        }
        if (out != base_logits) std::memmove(out, base_logits, sizeof(float) * n_base);
        return;
    }
    const detail::FuseArgs args{out, base_logits, value_logits, token_map, token_weights,
                                alpha, n_base, n_value};
    if (n_value == 0) {  // every entry must be -1; the SIMD gathers may read value[0]
        detail::fuse_scalar_range(args, 0, n_base);
        return;
    }
    kernels.fuse(args);
}

}  // namespace ivl
