// test_fuse_terms.cpp - fuse_terms at every SIMD level against the scalar level and a plain
// reference: 0/1/3 terms, raw and log-softmax, mapped and weighted, odd lengths and 262,144
// entries, infinities, NaN and map errors, the plausibility mask, and fuse_terms_and_sample
// against fuse-then-sample (cases of tests/test_fuse_terms.py).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "core/fuse.h"
#include "core/fuse_terms.h"
#include "core/sampler.h"

namespace ivl::test {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kLengths[] = {1, 7, 31, 32, 33, 63, 257, 4099, 262'144};
// Each level's own float exps in the logsumexp, FMA or not: tests/test_fuse_terms.py's.
constexpr double kTol = 1e-5;

struct TermData {
    std::vector<float> logits;
    std::vector<int32_t> token_map;    // empty = identity
    std::vector<float> token_weights;  // empty = all 1
    float weight = 1.0f;
    TermTransform transform = TermTransform::kRaw;

    FuseTerm term() const {
        return {logits.data(), static_cast<int64_t>(logits.size()),
                token_map.empty() ? nullptr : token_map.data(),
                token_weights.empty() ? nullptr : token_weights.data(), weight, transform};
    }
};

struct TermsCase {
    std::vector<float> base;
    std::vector<TermData> terms;
    float mask_alpha = 0.0f;

    std::vector<FuseTerm> views() const {
        std::vector<FuseTerm> out;
        for (const auto& t : terms) out.push_back(t.term());
        return out;
    }
    std::vector<float> run() const {
        std::vector<float> out(base.size());
        const auto v = views();
        fuse_terms(out.data(), base.data(), static_cast<int64_t>(base.size()), v.data(),
                   static_cast<int>(v.size()), mask_alpha);
        return out;
    }
    // fuse_terms.h's rules, element by element, logsumexp in double with std::exp.
    std::vector<float> reference() const {
        std::vector<float> out = base;
        for (const auto& t : terms) {
            if (t.weight == 0.0f) continue;
            float shift = 0.0f;
            if (t.transform == TermTransform::kLogSoftmax) {
                const double top = *std::max_element(t.logits.begin(), t.logits.end());
                double sum = 0.0;
                for (const float z : t.logits) sum += std::exp(double(z) - top);
                shift = static_cast<float>(top + std::log(sum));
            }
            for (size_t i = 0; i < base.size(); ++i) {
                const int64_t j = t.token_map.empty() ? int64_t(i) : t.token_map[i];
                const float c = t.weight * (t.token_weights.empty() ? 1.0f : t.token_weights[i]);
                if (j < 0 || c == 0.0f || std::isinf(base[i])) continue;
                const volatile float product = c * (t.logits[size_t(j)] - shift);
                const float r = out[i] + product;
                out[i] = std::isnan(r) ? -kInf : r;
            }
        }
        if (mask_alpha > 0.0f) {
            const double bound = double(*std::max_element(base.begin(), base.end())) +
                                 std::log(double(mask_alpha));
            for (size_t i = 0; i < base.size(); ++i) {
                if (double(base[i]) < bound) out[i] = -kInf;
            }
        }
        return out;
    }
};

TermData random_term(Rng& rng, int64_t n, bool mapped, bool weighted, float weight,
                     TermTransform transform) {
    TermData t;
    const int64_t n_logits = mapped ? std::max<int64_t>(1, n / 2 + 3) : n;
    t.logits = random_logits(rng, n_logits);
    if (mapped) {
        t.token_map.resize(size_t(n));
        for (auto& j : t.token_map) j = int32_t(rng.integer(-1, n_logits));
    }
    if (weighted) {
        t.token_weights.resize(size_t(n));
        for (auto& w : t.token_weights) w = rng.uniform() < 0.1 ? 0.0f : float(rng.uniform());
    }
    t.weight = weight;
    t.transform = transform;
    return t;
}

TermsCase three_terms(int64_t n, uint64_t seed) {
    Rng rng(seed);
    TermsCase c;
    c.base = random_logits(rng, n);
    c.terms.push_back(random_term(rng, n, false, false, 0.8f, TermTransform::kRaw));
    c.terms.push_back(random_term(rng, n, true, true, 1.5f, TermTransform::kLogSoftmax));
    c.terms.push_back(random_term(rng, n, true, true, -1.5f, TermTransform::kLogSoftmax));
    return c;
}

void check_every_level(const std::string& name, const TermsCase& c) {
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
    });
}

void random_cases() {
    for (const int64_t n : kLengths) {
        const std::string at = " n=" + std::to_string(n);
        Rng rng(static_cast<uint64_t>(n));
        TermsCase none;
        none.base = random_logits(rng, n);
        for_each_level([&](const std::string&) {
            check_equal("no terms is exactly base" + at, none.run(), none.base);
        });
        for (int combo = 0; combo < 8; ++combo) {
            const bool mapped = combo & 1, weighted = combo & 2;
            const auto transform = (combo & 4) ? TermTransform::kLogSoftmax : TermTransform::kRaw;
            TermsCase c;
            c.base = none.base;
            c.terms.push_back(random_term(rng, n, mapped, weighted, weighted ? -0.7f : 1.3f,
                                          transform));
            check_every_level(std::string("one term ") + (mapped ? "mapped" : "identity") +
                                  (weighted ? "+weights" : "") + ((combo & 4) ? " log_softmax" : " raw") + at,
                              c);
        }
        check_every_level("three terms" + at, three_terms(n, uint64_t(n) + 1));
        TermsCase masked = three_terms(n, uint64_t(n) + 2);
        masked.mask_alpha = 0.1f;
        check_every_level("three terms, mask 0.1" + at, masked);
    }
}

void infinities_and_zeros() {
    const int64_t n = 70;
    TermsCase c;
    c.base.assign(n, 0.0f);
    TermData plus, minus, unread;
    plus.logits.assign(n, 0.0f);
    minus.logits.assign(n, 0.0f);
    c.base[0] = -kInf, plus.logits[0] = kInf;     // -inf base stays -inf
    c.base[1] = kInf, plus.logits[1] = -kInf;     // +inf base stays +inf
    minus.logits[2] = -kInf;                      // one -inf contribution
    plus.logits[3] = kInf;                        // one +inf contribution
    plus.logits[40] = kInf, minus.logits[40] = -kInf;  // opposite: -inf wins
    plus.logits[69] = -kInf, minus.logits[69] = kInf;  // in the tail
    minus.weight = 0.5f;
    unread.logits.assign(n, kNaN);  // weight 0: never read
    unread.weight = 0.0f;
    unread.transform = TermTransform::kLogSoftmax;
    c.terms = {plus, minus, unread};
    std::vector<float> expected(n, 0.0f);
    expected[0] = expected[2] = expected[40] = expected[69] = -kInf;
    expected[1] = expected[3] = kInf;
    for_each_level([&](const std::string&) { check_equal("infinities", c.run(), expected); });
}

void errors() {
    const int64_t n = 262'144;
    for (const int64_t index : {int64_t{0}, int64_t{31}, int64_t{100}, n - 1}) {
        TermsCase c;
        c.base.assign(n, 0.0f);
        c.base[index] = kNaN;
        c.mask_alpha = 0.5f;
        const std::string message = "NaN in base logits at index " + std::to_string(index);
        for_each_level([&](const std::string&) {
            check(error_of([&] { c.run(); }) == message, message);
        });
    }
    for (const int64_t index : {int64_t{3}, int64_t{40}, int64_t{1000}}) {
        const int64_t m = 1001;
        TermsCase c;
        c.base.assign(m, 0.0f);
        TermData ok, bad;
        ok.logits.assign(m, 0.0f);
        bad.logits.assign(m, 0.0f);
        bad.logits[index] = kNaN;
        bad.token_map.resize(m);
        for (int64_t i = 0; i < m; ++i) bad.token_map[i] = int32_t(m - 1 - i);
        c.terms = {ok, bad};
        TermsCase unused = c;
        unused.terms[1].token_map[m - 1 - index] = -1;
        TermsCase log_softmax = unused;
        log_softmax.terms[1].transform = TermTransform::kLogSoftmax;
        const std::string message = "NaN in term 1 logits at index " + std::to_string(index);
        for_each_level([&](const std::string&) {
            check(error_of([&] { c.run(); }) == message, message + " (mapped)");
            check_equal(message + " unmapped raw is not used", unused.run(), unused.base);
            check(error_of([&] { log_softmax.run(); }) == message,
                  message + " (log_softmax uses every logit)");
        });
    }
    TermsCase map_case;
    map_case.base.assign(100, 0.0f);
    TermData mapped;
    mapped.logits.assign(50, 0.0f);
    mapped.token_map.assign(100, 0);
    mapped.token_map[77] = 50;
    map_case.terms = {mapped};
    TermsCase plus_inf;
    plus_inf.base.assign(40, 0.0f);
    TermData inf_term;
    inf_term.logits.assign(40, 0.0f);
    inf_term.logits[17] = kInf;
    inf_term.transform = TermTransform::kLogSoftmax;
    plus_inf.terms = {inf_term};
    for_each_level([&](const std::string&) {
        check(error_of([&] { map_case.run(); }) == "term 0: token_map[77] = 50 is outside [-1, 50)",
              "map entry out of range names term and index");
        check_throws("log_softmax of +inf", "term 0: logit 17 is +inf", [&] { plus_inf.run(); });
    });
    TermsCase args;
    args.base.assign(16, 0.0f);
    TermData bad_weight;
    bad_weight.logits.assign(16, 0.0f);
    bad_weight.weight = kInf;
    args.terms = {bad_weight};
    check_throws("weight must be finite", "term 0: weight must be finite", [&] { args.run(); });
    args.terms[0].weight = 1.0f;
    args.mask_alpha = 1.5f;
    check_throws("mask_alpha outside [0, 1]", "mask_alpha must be in [0, 1]", [&] { args.run(); });
}

void identities() {
    Rng rng(21);
    const int64_t n = 4099;
    TermsCase c;
    c.base = random_logits(rng, n);
    TermData expert = random_term(rng, n, true, true, 0.8f, TermTransform::kLogSoftmax);
    TermData anti = expert;
    anti.weight = -0.8f;
    c.terms = {expert, anti};
    TermsCase halves;
    halves.base = c.base;
    TermData half = expert;
    half.weight = 0.5f;
    halves.terms = {half, half};
    TermsCase whole = halves;
    whole.terms = {expert};
    whole.terms[0].weight = 1.0f;
    for_each_level([&](const std::string&) {
        check_close("expert - itself == base (float tolerance)", c.run(), c.base, 0.0, 4e-5);
        check_close("0.5 + 0.5 == 1.0 (float tolerance)", halves.run(), whole.run(), 0.0, 1e-5);
    });
}

void fuse_terms_and_sample_matches() {
    for (const int64_t n : {int64_t{33}, int64_t{4099}, int64_t{262'144}}) {
        TermsCase c = three_terms(n, uint64_t(n) + 3);
        c.mask_alpha = 0.05f;
        const auto views = c.views();
        for (const bool greedy : {true, false}) {
            SamplerParams params;
            params.temperature = greedy ? 0.0f : 0.8f;
            params.min_p = 0.0f;
            params.seed = 7;
            const std::string name = std::string("fuse_terms_and_sample ") +
                                     (greedy ? "greedy" : "top-k 40") + " n=" + std::to_string(n);
            for_each_level([&](const std::string&) {
                Sampler one_call(params), two_calls(params);
                std::vector<float> scratch(static_cast<size_t>(n));
                bool same = true;
                for (int step = 0; step < 8; ++step) {
                    const int32_t token = fuse_terms_and_sample(one_call, scratch.data(),
                                                                c.base.data(), n, views.data(),
                                                                3, c.mask_alpha);
                    const std::vector<float> fused = c.run();
                    same = same && token == two_calls.sample(fused.data(), n) && scratch == fused;
                }
                check(same, name + " == fuse_terms then sample");
            });
        }
    }
}

}  // namespace

void test_fuse_terms() {
    random_cases();
    infinities_and_zeros();
    errors();
    identities();
    fuse_terms_and_sample_matches();
}

}  // namespace ivl::test
