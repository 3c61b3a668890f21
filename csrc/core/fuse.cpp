// fuse.cpp - fuse_logits: argument checks the kernels rely on, then the active SIMD level.
#include "fuse.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace ivl {

namespace detail {

void check_fuse_args(int64_t n_base, int64_t n_value, const int32_t* token_map, float alpha) {
    if (n_base < 0 || n_value < 0) throw std::invalid_argument("negative vocabulary size");
    if (!std::isfinite(alpha)) throw std::invalid_argument("alpha must be a finite number");
    if (!token_map && n_value != n_base) {
        throw std::invalid_argument("without a token_map the value vocabulary (" +
                                    std::to_string(n_value) + ") must equal the base vocabulary (" +
                                    std::to_string(n_base) + ")");
    }
}

void fuse_chunk(const FuseArgs& a, int64_t i0, int64_t i1) {
    const auto& kernels = active_kernels();
    if (a.alpha == 0.0f) {  // base alone: value is not read at all
        const int64_t bad = kernels.first_nan(a.base + i0, i1 - i0);
        if (bad >= 0) {
            throw std::invalid_argument("NaN in base logits at index " +
                                        std::to_string(a.index0 + i0 + bad));
        }
        if (a.out != a.base) {
            std::memmove(a.out + i0, a.base + i0, sizeof(float) * static_cast<size_t>(i1 - i0));
        }
        return;
    }
    if (a.n_value == 0) {  // every entry must be -1; the SIMD gathers may read value[0]
        fuse_scalar_range(a, i0, i1);
        return;
    }
    if (i0 == 0 && i1 == a.n_base) {
        kernels.fuse(a);
        return;
    }
    FuseArgs sub = a;
    sub.out = a.out + i0;
    sub.base = a.base + i0;
    sub.n_base = i1 - i0;
    if (a.token_map) {
        sub.token_map = a.token_map + i0;
    } else {
        sub.value = a.value + i0;
        sub.n_value = sub.n_base;
    }
    if (a.token_weights) sub.token_weights = a.token_weights + i0;
    sub.index0 = a.index0 + i0;
    kernels.fuse(sub);
}

}  // namespace detail

void fuse_logits(float* out, const float* base_logits, int64_t n_base,
                 const float* value_logits, int64_t n_value,
                 const int32_t* token_map, float alpha, const float* token_weights) {
    detail::check_fuse_args(n_base, n_value, token_map, alpha);
    const detail::FuseArgs args{out, base_logits, value_logits, token_map, token_weights,
                                alpha, n_base, n_value};
    detail::fuse_chunk(args, 0, n_base);
}

}  // namespace ivl
