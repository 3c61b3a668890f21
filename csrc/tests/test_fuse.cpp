// test_fuse.cpp - fuse_logits at every SIMD level against a plain reference and the scalar
// level: identity / mapped, with and without weights, odd lengths and block borders,
// 262,144-entry vocabularies, -inf and NaN as fuse.h defines them (cases of
// tests/test_kernels.py).
#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "core/fuse.h"

namespace ivl::test {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Odd lengths, block borders of every level (16, 32, 64 floats), a full Gemma vocabulary.
constexpr int64_t kLengths[] = {1, 7, 31, 32, 33, 63, 257, 4099, 262'144};
// FMA (vector levels) vs separate multiply and add (x86 scalar): tests/test_kernels.py's.
constexpr double kTol = 2e-6;

struct FuseCase {
    std::vector<float> base, value;
    std::vector<int32_t> token_map;    // empty = identity
    std::vector<float> token_weights;  // empty = all 1
    float alpha = 1.0f;

    int64_t n() const { return static_cast<int64_t>(base.size()); }
    const int32_t* map() const { return token_map.empty() ? nullptr : token_map.data(); }
    const float* weights() const { return token_weights.empty() ? nullptr : token_weights.data(); }

    std::vector<float> run() const {  // out of place, at the active level
        std::vector<float> out(base.size());
        fuse_logits(out.data(), base.data(), n(), value.data(),
                    static_cast<int64_t>(value.size()), map(), alpha, weights());
        return out;
    }
    std::vector<float> run_in_place() const {
        std::vector<float> out = base;
        fuse_logits(out.data(), out.data(), n(), value.data(),
                    static_cast<int64_t>(value.size()), map(), alpha, weights());
        return out;
    }
    // tests/test_kernels.py's numpy reference: float32 coef = alpha * w, then base + coef * v
    // rounded twice; zero contributions, unmapped tokens and infinite bases keep base.
    std::vector<float> reference() const {
        std::vector<float> out(base.size());
        for (size_t i = 0; i < base.size(); ++i) {
            const int64_t j = token_map.empty() ? static_cast<int64_t>(i) : token_map[i];
            const float coef = alpha * (token_weights.empty() ? 1.0f : token_weights[i]);
            if (j < 0 || coef == 0.0f || std::isinf(base[i])) {
                out[i] = base[i];
                continue;
            }
            const volatile float product = coef * value[static_cast<size_t>(j)];  // no FMA here
            out[i] = base[i] + product;
        }
        return out;
    }
};

FuseCase random_case(int64_t n, bool mapped, bool weighted, uint64_t seed) {
    Rng rng(seed);
    FuseCase c;
    c.base = random_logits(rng, n);
    const int64_t n_value = mapped ? std::max<int64_t>(1, n / 2 + 3) : n;
    c.value = random_logits(rng, n_value);
    if (mapped) {
        c.token_map.resize(static_cast<size_t>(n));
        for (auto& j : c.token_map) j = static_cast<int32_t>(rng.integer(-1, n_value));
    }
    if (weighted) {
        c.token_weights.resize(static_cast<size_t>(n));
        for (auto& w : c.token_weights) w = rng.uniform() < 0.1 ? 0.0f : float(rng.uniform());
    }
    c.alpha = mapped ? 1.3f : 0.7f;
    return c;
}

// Every level against the reference and every vector level against the scalar level's
// output; in place gives the bits of out of place.
void check_every_level(const std::string& name, const FuseCase& c) {
    const std::vector<float> expected = c.reference();
    std::vector<float> scalar;
    for_each_level([&](const std::string& level) {
        const std::vector<float> out = c.run();
        check_close(name + " vs reference", out, expected, kTol, kTol);
        if (level == "scalar") {
            scalar = out;
        } else {
            check_close(name + " vs scalar level", out, scalar, kTol, kTol);
        }
        check_equal(name + " in place == out of place", c.run_in_place(), out);
    });
}

std::vector<int32_t> reversed(int64_t n) {
    std::vector<int32_t> map(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) map[static_cast<size_t>(i)] = static_cast<int32_t>(n - 1 - i);
    return map;
}

std::vector<int32_t> identity_map(int64_t n) {
    std::vector<int32_t> map(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) map[static_cast<size_t>(i)] = static_cast<int32_t>(i);
    return map;
}

void random_cases() {
    for (const int64_t n : kLengths) {
        for (int combo = 0; combo < 4; ++combo) {
            const bool mapped = combo & 1, weighted = combo & 2;
            const std::string name = std::string("fuse ") + (mapped ? "mapped" : "identity") +
                                     (weighted ? "+weights" : "") + " n=" + std::to_string(n);
            check_every_level(name, random_case(n, mapped, weighted, uint64_t(n) * 4 + combo));
        }
    }
}

void zero_contributions_are_exactly_base() {
    Rng rng(3);
    const int64_t n = 1000;
    FuseCase c;
    c.base = random_logits(rng, n);
    c.value = random_logits(rng, n);
    for (int64_t i = 0; i < n; i += 3) c.value[i] = -kInf;
    for (int64_t i = 1; i < n; i += 3) c.value[i] = kInf;
    c.token_map = identity_map(n);
    for (int64_t i = 0; i < n; i += 2) c.token_map[i] = -1;
    c.token_weights.assign(n, 1.0f);
    for (int64_t i = 1; i < n; i += 2) c.token_weights[i] = 0.0f;  // every mapped entry
    c.alpha = 2.0f;
    for_each_level([&](const std::string&) {
        check_equal("unmapped and zero-weight entries are exactly base", c.run(), c.base);
    });
}

void alpha_zero_is_exactly_base() {
    for (const int64_t n : {int64_t{7}, int64_t{33}, int64_t{262'144}}) {
        Rng rng(4);
        FuseCase c;
        c.base = random_logits(rng, n);
        for (int64_t i = 0; i < n; i += 5) c.base[i] = -kInf;
        c.value = random_logits(rng, n);
        for (int64_t i = 0; i < n; i += 2) c.value[i] = -kInf;
        for (int64_t i = 1; i < n; i += 4) c.value[i] = kNaN;  // not read when alpha == 0
        c.alpha = 0.0f;
        FuseCase mapped = c;
        mapped.token_map = reversed(n);
        const std::string at = " n=" + std::to_string(n);
        for_each_level([&](const std::string&) {
            check_equal("alpha 0 identity is exactly base" + at, c.run(), c.base);
            check_equal("alpha 0 mapped is exactly base" + at, mapped.run(), c.base);
            check_equal("alpha 0 in place is exactly base" + at, mapped.run_in_place(), c.base);
        });
    }
}

void infinities() {
    const int64_t n = 70;  // two 32-float blocks and a tail; four 16-float blocks and a tail
    FuseCase c;
    c.base.assign(n, 0.0f);
    c.value.assign(n, 0.0f);
    c.base[0] = -kInf, c.value[0] = kInf;   // -inf base stays -inf despite +inf value
    c.base[1] = 1.0f, c.value[1] = -kInf;   // finite + (-inf) contribution -> -inf
    c.base[2] = -kInf, c.value[2] = 5.0f;   // -inf + finite -> -inf
    c.base[40] = 2.0f, c.value[40] = kInf;  // -> +inf
    c.base[69] = -kInf, c.value[69] = kInf; // in the tail
    for (const bool mapped : {false, true}) {
        FuseCase half = c, flipped = c;
        half.alpha = 0.5f;
        flipped.alpha = -1.0f;  // a negative alpha flips the infinite contribution
        if (mapped) half.token_map = flipped.token_map = identity_map(n);
        const std::string kind = mapped ? " (mapped)" : " (identity)";
        for_each_level([&](const std::string&) {
            const auto out = half.run();
            bool ok = out[0] == -kInf && out[1] == -kInf && out[2] == -kInf && out[40] == kInf &&
                      out[69] == -kInf;
            for (int64_t i = 3; i < 40; ++i) ok = ok && out[i] == 0.0f;
            for (const float x : out) ok = ok && !std::isnan(x);
            check(ok, "infinities, alpha 0.5" + kind);
            const auto neg = flipped.run();
            check(neg[1] == kInf && neg[40] == -kInf && neg[0] == -kInf,
                  "infinities, alpha -1" + kind);
        });
    }
}

void nan_errors() {
    const int64_t n = 262'144;
    for (const int64_t index : {0, 5, 31, 32, 100, 262'143}) {
        FuseCase c;
        c.base.assign(n, 0.0f);
        c.value.assign(n, 0.0f);
        c.base[index] = kNaN;
        FuseCase off = c, mapped = c;
        off.alpha = 0.0f;
        mapped.token_map = identity_map(n);
        const std::string message = "NaN in base logits at index " + std::to_string(index);
        for_each_level([&](const std::string&) {
            check(error_of([&] { c.run(); }) == message, message + " (identity)");
            check(error_of([&] { off.run(); }) == message, message + " (alpha 0)");
            check(error_of([&] { mapped.run(); }) == message, message + " (mapped)");
        });
    }
    for (const int64_t index : {3, 40, 1000}) {
        const int64_t m = 1001;
        FuseCase c;
        c.base.assign(m, 0.0f);
        c.value.assign(m, 0.0f);
        c.value[index] = kNaN;
        FuseCase rev = c, unused = c;
        rev.token_map = reversed(m);
        unused.token_map = reversed(m);
        unused.token_map[m - 1 - index] = -1;  // the NaN is mapped by nobody: not used
        const std::string message = "NaN in value logits at index " + std::to_string(index);
        for_each_level([&](const std::string&) {
            check(error_of([&] { c.run(); }) == message, message + " (identity)");
            check(error_of([&] { rev.run(); }) == message, message + " (reversed map)");
            check_equal(message + " unmapped is not used", unused.run(), unused.base);
        });
    }
    FuseCase in_place;  // the error still names the base index when out == base
    in_place.base.assign(64, 0.0f);
    in_place.base[10] = kNaN;
    in_place.value.assign(64, 1.0f);
    for_each_level([&](const std::string&) {
        check(error_of([&] { in_place.run_in_place(); }) == "NaN in base logits at index 10",
              "in-place NaN error names the base index");
    });
}

void map_errors() {
    for (const int32_t bad : {-2, 50, INT_MAX, INT_MIN}) {
        for (const int64_t at : {int64_t{77}, int64_t{99}}) {  // in a block, in the tail
            for (const bool weighted : {false, true}) {
                FuseCase c;
                c.base.assign(100, 0.0f);
                c.value.assign(50, 0.0f);
                c.token_map.assign(100, 0);
                c.token_map[at] = bad;
                if (weighted) c.token_weights.assign(100, 0.5f);
                const std::string message = "token_map[" + std::to_string(at) + "] = " +
                                            std::to_string(bad) + " is outside [-1, 50)";
                for_each_level([&](const std::string&) {
                    check(error_of([&] { c.run(); }) == message,
                          message + (weighted ? " (weighted)" : ""));
                });
            }
        }
    }
    FuseCase empty;  // an empty value vocabulary: only -1 entries are valid
    for (int i = 0; i < 40; ++i) empty.base.push_back(float(i));
    empty.token_map.assign(40, -1);
    FuseCase bad_empty = empty;
    bad_empty.token_map[3] = 0;
    for_each_level([&](const std::string&) {
        check_equal("empty value vocabulary, all unmapped", empty.run(), empty.base);
        check(error_of([&] { bad_empty.run(); }) == "token_map[3] = 0 is outside [-1, 0)",
              "empty value vocabulary rejects entry 0");
    });
    FuseCase args;
    args.base.assign(16, 0.0f);
    args.value.assign(17, 0.0f);
    check_throws("identity needs equal sizes", "without a token_map the value vocabulary (17)",
                 [&] { args.run(); });
    args.value.assign(16, 0.0f);
    args.alpha = kNaN;
    check_throws("alpha NaN is rejected", "alpha must be a finite number", [&] { args.run(); });
}

}  // namespace

void test_fuse() {
    random_cases();
    zero_contributions_are_exactly_base();
    alpha_zero_is_exactly_base();
    infinities();
    nan_errors();
    map_errors();
}

}  // namespace ivl::test
