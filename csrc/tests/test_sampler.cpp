// test_sampler.cpp - the sampler chain at every SIMD level against a plain reference chain
// and the scalar level: probability tables per step, penalties, greedy ties, seeded draws,
// the fused fuse_and_sample path across chunk borders (cases of tests/test_sampler.py).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "check.h"
#include "core/fuse.h"
#include "core/sampler.h"

namespace ivl::test {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

SamplerParams make_params(float temperature, int32_t top_k, float top_p, float min_p,
                          uint64_t seed = 0) {
    SamplerParams p;
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.seed = seed;
    return p;
}

SamplerParams no_truncation(float temperature = 1.0f) { return make_params(temperature, 0, 1.0f, 0.0f); }

std::string describe(const SamplerParams& p) {
    return "t=" + std::to_string(p.temperature).substr(0, 4) + " k=" + std::to_string(p.top_k) +
           " p=" + std::to_string(p.top_p).substr(0, 4) + " min_p=" +
           std::to_string(p.min_p).substr(0, 4);
}

// Candidates and probabilities, best first.
struct Table {
    std::vector<int32_t> ids;
    std::vector<float> probs;
};

Table table_of(const std::vector<std::pair<int32_t, float>>& pairs) {
    Table t;
    for (const auto& [id, prob] : pairs) {
        t.ids.push_back(id);
        t.probs.push_back(prob);
    }
    return t;
}

Table softmax_table(std::vector<int32_t> ids, const std::vector<double>& logits) {
    const double top = *std::max_element(logits.begin(), logits.end());
    double total = 0.0;
    for (const double x : logits) total += std::exp(x - top);
    Table t{std::move(ids), {}};
    for (const double x : logits) t.probs.push_back(static_cast<float>(std::exp(x - top) / total));
    return t;
}

// The chain written plainly (tests/test_sampler.py's chain_reference): a full sort in double.
Table chain_reference(const std::vector<float>& logits, double temperature, int top_k,
                      double top_p, double min_p) {
    std::vector<int32_t> order;
    for (size_t i = 0; i < logits.size(); ++i) {
        if (std::isfinite(logits[i])) order.push_back(static_cast<int32_t>(i));
    }
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    if (top_k > 0 && order.size() > static_cast<size_t>(top_k)) order.resize(top_k);
    std::vector<double> scaled;
    for (const int32_t i : order) scaled.push_back(static_cast<double>(logits[i]) / temperature);
    if (top_p < 1.0) {
        const Table full = softmax_table(order, scaled);
        double mass = 0.0;
        size_t keep = scaled.size();
        for (size_t i = 0; i < scaled.size(); ++i) {
            mass += full.probs[i];
            if (mass >= top_p) {
                keep = i + 1;
                break;
            }
        }
        order.resize(keep);
        scaled.resize(keep);
    }
    if (min_p > 0.0) {
        const double top = scaled.front();
        std::vector<int32_t> kept_ids;
        std::vector<double> kept;
        for (size_t i = 0; i < scaled.size(); ++i) {
            if (scaled[i] - top >= std::log(min_p)) {
                kept_ids.push_back(order[i]);
                kept.push_back(scaled[i]);
            }
        }
        order.swap(kept_ids);
        scaled.swap(kept);
    }
    return softmax_table(order, scaled);
}

Table by_id(Table t) {  // the same table ordered by id
    std::vector<size_t> order(t.ids.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return t.ids[a] < t.ids[b]; });
    Table out;
    for (const size_t i : order) {
        out.ids.push_back(t.ids[i]);
        out.probs.push_back(t.probs[i]);
    }
    return out;
}

void check_table(const std::string& name, const Table& got, const Table& want, double rtol,
                 double atol) {
    std::string detail;
    if (got.ids != want.ids) {
        detail = std::to_string(got.ids.size()) + " ids vs " + std::to_string(want.ids.size());
        for (size_t i = 0; i < std::min(got.ids.size(), want.ids.size()); ++i) {
            if (got.ids[i] != want.ids[i]) {
                detail += ", first difference at " + std::to_string(i) + ": id " +
                          std::to_string(got.ids[i]) + " vs " + std::to_string(want.ids[i]);
                break;
            }
        }
        check(false, name + " ids", detail);
        return;
    }
    check(all_close(got.probs, want.probs, rtol, atol, detail), name, detail);
}

// Sampler::probs at every level: against `want` (tests/test_sampler.py's tolerances) and,
// for vector levels, against the scalar level's table (exp within 1 ulp, other sum order).
void check_probs_every_level(const std::string& name, const SamplerParams& params,
                             const std::vector<float>& logits, const Table& want,
                             double rtol = 1e-5, double atol = 1e-7, bool compare_by_id = false,
                             const std::vector<int32_t>& accepted = {}) {
    Table scalar;
    for_each_level([&](const std::string& level) {
        Sampler sampler(params);
        for (const int32_t token : accepted) sampler.accept(token);
        Table got = table_of(sampler.probs(logits.data(), static_cast<int64_t>(logits.size())));
        if (compare_by_id) got = by_id(got);
        check_table(name, got, compare_by_id ? by_id(want) : want, rtol, atol);
        if (level == "scalar") {
            scalar = got;
        } else {
            check_table(name + " vs scalar level", got, scalar, 1e-6, 1e-12);
        }
    });
}

std::vector<float> log_of(const std::vector<double>& p) {
    std::vector<float> out;
    for (const double x : p) out.push_back(static_cast<float>(std::log(x)));
    return out;
}

// --- probability tables, one step at a time ---------------------------------------------

void tables() {
    const std::vector<float> logits{1, 2, 3, 4, 5};
    check_probs_every_level("no truncation is softmax", no_truncation(), logits,
                            softmax_table({4, 3, 2, 1, 0}, {5, 4, 3, 2, 1}));
    check_probs_every_level("top-k 2", make_params(1, 2, 1, 0), logits,
                            softmax_table({4, 3}, {5, 4}));
    check_probs_every_level("top-k 9 > vocabulary", make_params(1, 9, 1, 0), logits,
                            softmax_table({4, 3, 2, 1, 0}, {5, 4, 3, 2, 1}));
    for (const double t : {0.5, 4.0}) {
        check_probs_every_level("temperature " + std::to_string(t).substr(0, 3),
                                no_truncation(float(t)), logits,
                                softmax_table({4, 3, 2, 1, 0}, {5 / t, 4 / t, 3 / t, 2 / t, 1 / t}));
    }
    const std::vector<double> probs4{0.5, 0.3, 0.15, 0.05};
    const auto truncated = [&](size_t kept) {
        Table t;
        const double mass = std::accumulate(probs4.begin(), probs4.begin() + kept, 0.0);
        for (size_t i = 0; i < kept; ++i) {
            t.ids.push_back(static_cast<int32_t>(i));
            t.probs.push_back(static_cast<float>(probs4[i] / mass));
        }
        return t;
    };
    for (const auto& [top_p, kept] : {std::pair{0.4f, 1}, {0.75f, 2}, {0.85f, 3}, {0.99f, 4}}) {
        check_probs_every_level("top-p " + std::to_string(top_p).substr(0, 4),
                                make_params(1, 0, top_p, 0), log_of(probs4), truncated(kept));
    }
    for (const auto& [min_p, kept] : {std::pair{0.05f, 4}, {0.2f, 3}, {0.5f, 2}, {0.9f, 1}}) {
        check_probs_every_level("min-p " + std::to_string(min_p).substr(0, 4),
                                make_params(1, 0, 1, min_p), log_of(probs4), truncated(kept));
    }
}

void penalties() {
    SamplerParams p = no_truncation();
    p.repeat_penalty = 2.0f;
    p.repeat_last_n = 8;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.25f;
    const std::vector<float> logits{2.0f, -1.0f, 0.5f, 3.0f};
    // seen twice: 2/2 - 2*0.5 - 0.25; seen once (negative logit): -1*2 - 0.5 - 0.25
    check_probs_every_level("penalties table", p, logits,
                            softmax_table({3, 2, 0, 1}, {3.0, 0.5, -0.25, -2.75}), 1e-5, 1e-7,
                            false, {0, 0, 1});
    for_each_level([&](const std::string&) {
        Sampler sampler(p);
        for (const int32_t token : {0, 0, 1}) sampler.accept(token);
        sampler.reset();
        check_table("penalties cleared by reset()", table_of(sampler.probs(logits.data(), 4)),
                    softmax_table({3, 0, 2, 1}, {3.0, 2.0, 0.5, -1.0}), 1e-5, 1e-7);
    });
    SamplerParams window = no_truncation();
    window.repeat_last_n = 1;
    window.presence_penalty = 1.0f;
    check_probs_every_level("penalty window is the last n", window, {1, 1, 1},
                            softmax_table({0, 1, 2}, {1, 1, 0}), 1e-5, 1e-7, false, {0, 2});
    window.repeat_last_n = 0;
    check_probs_every_level("repeat_last_n 0 disables penalties", window, {1, 1, 1},
                            softmax_table({0, 1, 2}, {1, 1, 1}), 1e-5, 1e-7, false, {0});

    SamplerParams greedy = make_params(0, 40, 0.95f, 0.05f);
    greedy.repeat_penalty = 10.0f;
    for_each_level([&](const std::string&) {
        Sampler sampler(greedy);
        sampler.accept(0);
        const std::vector<float> input{3.0f, 1.0f, 2.0f};
        check(sampler.sample(input.data(), 3) == 2, "greedy with penalty picks token 2");
        check_equal("penalties do not modify the input", input, {3.0f, 1.0f, 2.0f});
        SamplerParams halve = make_params(0, 40, 0.95f, 0.05f);
        halve.repeat_penalty = 2.0f;
        Sampler g(halve);
        const std::vector<float> l{1.0f, 3.0f, 2.0f};
        check(g.sample(l.data(), 3) == 1, "greedy before penalties");
        g.accept(1);
        check(g.sample(l.data(), 3) == 2, "greedy applies penalties (3 / 2 < 2)");
    });
}

// --- full chains on large vocabularies --------------------------------------------------

void large_vocab_chains() {
    Rng rng(11);
    std::vector<float> logits = random_logits(rng, 50'000);
    for (int i = 0; i < 1000; ++i) logits[rng.integer(0, 50'000)] = -kInf;
    for (const SamplerParams& p : {make_params(0.8f, 40, 0.9f, 0.0f), make_params(1.3f, 0, 0.7f, 0.0f),
                                   make_params(0.6f, 0, 1.0f, 0.05f),
                                   make_params(1.0f, 100, 0.95f, 0.02f)}) {
        check_probs_every_level("chain on 50,000 logits " + describe(p), p, logits,
                                chain_reference(logits, p.temperature, p.top_k, p.top_p, p.min_p));
    }

    Rng full(12);
    std::vector<float> gemma = random_logits(full, 262'144, 2.5);
    for (int i = 0; i < 30; ++i) gemma[full.integer(0, 262'144)] += 10.0f;
    check_probs_every_level("top-k 40 top-p 0.9 on 262,144 logits", make_params(0.8f, 40, 0.9f, 0),
                            gemma, chain_reference(gemma, 0.8, 40, 0.9, 0.0));

    // top_k = 0: counted collect, vectorised exp, top-p bands. Compared by id: logits / t in
    // float32 can tie where the double reference does not.
    for (const int64_t n : {5, 9, 1031, 262'144}) {
        Rng r(static_cast<uint64_t>(n));
        std::vector<float> x = random_logits(r, n, 1.5);
        for (auto& v : x) {
            if (r.uniform() < 0.03) v = -kInf;
        }
        for (int i = 0; i < std::min<int64_t>(n, 4); ++i) x[r.integer(0, n)] += 4.0f;
        for (const SamplerParams& p :
             {make_params(0.8f, 0, 0.9f, 0), make_params(1.5f, 0, 0.95f, 0),
              make_params(0.7f, 0, 1.0f, 0), make_params(1.0f, 0, 0.5f, 0.01f)}) {
            check_probs_every_level(
                "top-k off n=" + std::to_string(n) + " " + describe(p), p, x,
                chain_reference(x, p.temperature, p.top_k, p.top_p, p.min_p), 1e-5, 1e-9, true);
        }
    }

    // Weights of e^-709 and below are subnormal or zero (the vector exp hands those lanes to
    // std::exp).
    const std::vector<float> deep{0.0f, -1.0f, -708.5f, -709.0f, -720.0f, -745.0f, -800.0f,
                                  -1e30f, -2.0f, -3.0f, -740.0f, -0.5f};
    check_probs_every_level("exp underflow after top-k", make_params(1, 12, 1, 0), deep,
                            chain_reference(deep, 1, 12, 1, 0), 1e-6, 1e-45);
}

// --- draws ------------------------------------------------------------------------------

std::vector<int32_t> draws(Sampler& sampler, const std::vector<float>& logits, int count) {
    std::vector<int32_t> out;
    for (int i = 0; i < count; ++i) {
        out.push_back(sampler.sample(logits.data(), static_cast<int64_t>(logits.size())));
    }
    return out;
}

void seeded_draws() {
    const std::vector<float> four = log_of({0.5, 0.25, 0.15, 0.1});
    Rng rng(13);
    const std::vector<float> gemma = random_logits(rng, 262'144, 2.0);
    Rng rng21(21);
    const std::vector<float> other = random_logits(rng21, 262'144, 2.0);
    std::vector<int32_t> scalar_draws;
    for_each_level([&](const std::string& level) {
        Sampler freq(make_params(1, 0, 1, 0, 1234));
        std::vector<double> counts(4, 0.0);
        for (const int32_t t : draws(freq, four, 20'000)) counts[t] += 1.0 / 20'000;
        bool ok = true;
        const double want[] = {0.5, 0.25, 0.15, 0.1};
        for (int i = 0; i < 4; ++i) ok = ok && std::fabs(counts[i] - want[i]) <= 0.015;
        check(ok, "draw frequencies match the probabilities");

        Sampler survivors(make_params(1, 2, 1, 0, 3));
        const auto seen = draws(survivors, {5.0f, 4.9f, 4.8f, 0.0f, -1.0f}, 500);
        check(std::set<int32_t>(seen.begin(), seen.end()) == std::set<int32_t>{0, 1},
              "draws only from the top-k survivors");

        const SamplerParams p42 = make_params(1.5f, 0, 0.95f, 0, 42);
        Sampler a(p42), b(p42), c(make_params(1.5f, 0, 0.95f, 0, 43));
        const auto first = draws(a, gemma, 12);
        check(first == draws(b, gemma, 12), "same seed, same draws (262,144 logits)");
        check(first != draws(c, gemma, 12), "another seed, other draws");
        a.reset();
        check(first == draws(a, gemma, 12), "reset() replays the draws");

        Sampler agree(make_params(1.2f, 0, 0.95f, 0, 77));
        const auto d = draws(agree, other, 20);
        if (level == "scalar") {
            scalar_draws = d;
        } else {
            check(d == scalar_draws, "seeded draws equal the scalar level's");
        }

        // std::mt19937_64 is fully specified (seed 5489: first output 14514284786278117030,
        // 10000th 9981545732273789042); a draw is the top 53 bits as a uniform in [0, 1).
        Sampler stream(make_params(1, 0, 1, 0, 5489));
        const auto d10k = draws(stream, four, 10'000);
        const auto expected = [](uint64_t output) {
            const double u = static_cast<double>(output >> 11) * 0x1.0p-53;
            const double cumulative[] = {0.5, 0.75, 0.9, 1.0};
            int32_t token = 0;
            while (token < 3 && cumulative[token] <= u) ++token;
            return token;
        };
        check(d10k.front() == expected(14514284786278117030ull) &&
                  d10k.back() == expected(9981545732273789042ull),
              "draws follow the standard mt19937_64 stream");
    });
    std::mt19937_64 engine;  // the standard's own conformance value
    engine.discard(9999);
    check(engine() == 9981545732273789042ull, "std::mt19937_64 10000th output");
}

void greedy() {
    std::vector<float> logits(262'144, 0.0f);
    logits[200'000] = 7.0f;
    logits[100'001] = 7.0f;
    logits[5] = 6.9f;
    std::vector<float> block(64, 0.0f);  // a tie inside one vector: the lower lane wins
    block[9] = block[12] = block[13] = 3.0f;
    for_each_level([&](const std::string&) {
        Sampler in_block(make_params(0, 40, 0.95f, 0.05f));
        check(in_block.sample(block.data(), 64) == 9, "greedy tie inside one vector");
        for (const uint64_t seed : {0, 1, 2}) {
            Sampler sampler(make_params(0, 40, 0.95f, 0.05f, seed));
            check(sampler.sample(logits.data(), 262'144) == 100'001,
                  "greedy tie on 262,144 logits goes to the lowest id");
            const auto probs = sampler.probs(logits.data(), 262'144);
            check(probs.size() == 1 && probs[0].first == 100'001 && probs[0].second == 1.0f,
                  "greedy probs are the argmax with probability 1");
        }
        Sampler small(make_params(0, 40, 0.95f, 0.05f));
        const std::vector<float> tie{1.0f, 5.0f, 5.0f, 2.0f};
        check(small.sample(tie.data(), 4) == 1, "greedy tie on 4 logits");
    });
}

void errors() {
    for_each_level([&](const std::string&) {
        Sampler greedy(make_params(0, 40, 0.95f, 0.05f));
        Sampler hot(no_truncation());
        const std::vector<float> nan{0.0f, kNaN}, none(3, -kInf);
        check(error_of([&] { greedy.sample(nan.data(), 2); }) == "NaN in logits at index 1",
              "NaN in logits is rejected with its index");
        check_throws("all -inf (temperature 1)", "all logits are -inf",
                     [&] { hot.sample(none.data(), 2); });
        check_throws("all -inf (greedy)", "all logits are -inf",
                     [&] { greedy.sample(none.data(), 3); });
        check_throws("empty logits", "empty logits", [&] { greedy.sample(none.data(), 0); });
    });
    const auto invalid = [](const char* what, auto edit) {
        SamplerParams p;
        edit(p);
        check_throws(std::string("invalid setting ") + what, "invalid sampler setting",
                     [&] { Sampler s(p); });
    };
    invalid("temperature -1", [](SamplerParams& p) { p.temperature = -1; });
    invalid("top_k -1", [](SamplerParams& p) { p.top_k = -1; });
    invalid("top_p 0", [](SamplerParams& p) { p.top_p = 0; });
    invalid("top_p 1.5", [](SamplerParams& p) { p.top_p = 1.5f; });
    invalid("min_p 1", [](SamplerParams& p) { p.min_p = 1; });
    invalid("repeat_penalty 0", [](SamplerParams& p) { p.repeat_penalty = 0; });
    invalid("repeat_last_n -1", [](SamplerParams& p) { p.repeat_last_n = -1; });
    invalid("presence_penalty inf", [](SamplerParams& p) { p.presence_penalty = kInf; });
}

// --- fuse_and_sample: the chunked fuse + top-k / argmax ---------------------------------

struct FusedInputs {
    std::vector<float> base, value, weights;
    std::vector<int32_t> token_map;
    const int32_t* map() const { return token_map.empty() ? nullptr : token_map.data(); }
    const float* w() const { return weights.empty() ? nullptr : weights.data(); }
    int64_t n() const { return static_cast<int64_t>(base.size()); }
    int64_t n_value() const { return static_cast<int64_t>(value.size()); }

    std::vector<float> fuse(float alpha) const {
        std::vector<float> out(base.size());
        fuse_logits(out.data(), base.data(), n(), value.data(), n_value(), map(), alpha, w());
        return out;
    }
    int32_t fuse_and_sample(Sampler& sampler, std::vector<float>& scratch, float alpha) const {
        return ivl::fuse_and_sample(sampler, scratch.data(), base.data(), n(), value.data(),
                                    n_value(), map(), alpha, w());
    }
};

// tests/test_sampler.py's _fused_inputs: -inf holes, tied maxima across the 4096-float chunk
// borders.
FusedInputs fused_inputs(int64_t n, bool mapped) {
    Rng rng(static_cast<uint64_t>(n) * 2 + mapped);
    FusedInputs in;
    in.base = random_logits(rng, n, 2.0);
    for (auto& b : in.base) {
        if (rng.uniform() < 0.05) b = -kInf;
    }
    std::vector<int64_t> ties;
    for (const int64_t i : {int64_t{3}, int64_t{4095}, int64_t{4096}, n - 1}) {
        if (i < n) ties.push_back(i);
    }
    for (const int64_t i : ties) in.base[i] = 9.0f;
    if (mapped) {
        const int64_t n_value = std::max<int64_t>(1, n / 3 + 5);
        in.value = random_logits(rng, n_value, 1.0);
        in.token_map.resize(n);
        for (auto& j : in.token_map) j = static_cast<int32_t>(rng.integer(-1, n_value));
        for (const int64_t i : ties) in.token_map[i] = -1;  // keep the ties exact
        in.weights.resize(n);
        for (auto& w : in.weights) w = static_cast<float>(rng.uniform());
    } else {
        in.value = random_logits(rng, n, 0.5);
        for (const int64_t i : ties) in.value[i] = 0.0f;
    }
    return in;
}

void fused_matches_fuse_then_sample() {
    for (const int64_t n : {1, 7, 33, 4095, 4097, 8193, 70'001}) {
        for (const bool mapped : {false, true}) {
            const FusedInputs in = fused_inputs(n, mapped);
            for (const SamplerParams& config :
                 {make_params(0.9f, 40, 0.9f, 0.0f, 5), make_params(1.0f, 5, 1.0f, 0.05f, 5),
                  make_params(0.0f, 40, 0.95f, 0.05f, 5)}) {
                const std::string name = "fuse_and_sample == fuse then sample, n=" +
                                         std::to_string(n) + (mapped ? " mapped " : " ") +
                                         describe(config);
                for_each_level([&](const std::string&) {
                    const std::vector<float> fused = in.fuse(0.8f);
                    Sampler one_call(config), two_calls(config);
                    std::vector<float> scratch(n);
                    bool same = true, scratch_same = true;
                    int32_t token = -1;
                    for (int step = 0; step < 8; ++step) {
                        token = in.fuse_and_sample(one_call, scratch, 0.8f);
                        same = same && token == two_calls.sample(fused.data(), n);
                        scratch_same = scratch_same && std::memcmp(scratch.data(), fused.data(),
                                                                   sizeof(float) * n) == 0;
                    }
                    check(same, name);
                    check(scratch_same, name + ": scratch holds the fuse");
                    if (config.temperature == 0.0f) {
                        const auto best = std::max_element(fused.begin(), fused.end());
                        check(token == best - fused.begin(), name + ": argmax, ties to lowest id");
                    }
                });
            }
        }
    }

    // With penalties the fused path falls back to fuse + chain: 20 steps, accepting each.
    Rng rng(14);
    FusedInputs in;
    const int64_t n = 70'001, n_value = 40'000;
    in.base = random_logits(rng, n, 2.0);
    in.value = random_logits(rng, n_value, 1.0);
    in.token_map.resize(n);
    for (auto& j : in.token_map) j = static_cast<int32_t>(rng.integer(-1, n_value));
    in.weights.assign(n, 1.0f);
    SamplerParams config = make_params(0.9f, 40, 0.9f, 0.0f, 7);
    config.repeat_penalty = 1.3f;
    for_each_level([&](const std::string&) {
        Sampler one_call(config), two_calls(config);
        std::vector<float> scratch(n);
        bool same = true;
        for (int step = 0; step < 20; ++step) {
            const int32_t token = in.fuse_and_sample(one_call, scratch, 0.8f);
            const std::vector<float> fused = in.fuse(0.8f);
            same = same && token == two_calls.sample(fused.data(), n);
            one_call.accept(token);
            two_calls.accept(token);
        }
        check(same, "fuse_and_sample == fuse then sample with penalties, 20 steps");
    });
}

void fused_ties_and_errors() {
    // top-k 40 draws come only from the exact top 40 (ties broken by the lower id).
    const int64_t n = 10'007;
    FusedInputs ties;
    ties.base.assign(n, -kInf);
    for (int64_t i = 0; i < n; i += 7) ties.base[i] = 1.0f;  // 1430 tied candidates
    for (const int64_t i : {5000, 9000, 10'006}) ties.base[i] = 2.0f;
    ties.value.assign(n, 0.0f);
    const Table top40 = chain_reference(ties.base, 1.0, 40, 1.0, 0.0);
    const std::set<int32_t> allowed(top40.ids.begin(), top40.ids.end());
    for_each_level([&](const std::string&) {
        Sampler sampler(make_params(1, 40, 1, 0, 9));
        std::vector<float> scratch(n);
        std::set<int32_t> seen;
        for (int i = 0; i < 3000; ++i) seen.insert(ties.fuse_and_sample(sampler, scratch, 1.0f));
        bool inside = true;
        for (const int32_t t : seen) inside = inside && allowed.count(t);
        check(inside && seen.size() > 30, "fused top-k 40 with 1430 ties draws from the top 40",
              std::to_string(seen.size()) + " distinct tokens");
    });

    FusedInputs small;  // identity, greedy
    small.base.assign(1000, 0.0f);
    small.value.assign(1000, 0.0f);
    small.base[123] = 5.0f;
    small.value[456] = 9.0f;
    const int64_t big = 20'000;  // errors name absolute indexes, past the first chunk
    FusedInputs e;
    e.base.assign(big, 0.0f);
    e.value.assign(big, 0.0f);
    for_each_level([&](const std::string&) {
        Sampler greedy(make_params(0, 40, 0.95f, 0.05f));
        std::vector<float> scratch(1000);
        check(small.fuse_and_sample(greedy, scratch, 1.0f) == 456, "fused greedy alpha 1");
        check(small.fuse_and_sample(greedy, scratch, 0.0f) == 123, "fused greedy alpha 0");
        FusedInputs nan = small;
        nan.value[7] = kNaN;
        check(error_of([&] { nan.fuse_and_sample(greedy, scratch, 1.0f); }) ==
                  "NaN in value logits at index 7",
              "fused greedy: NaN in value");

        Sampler sampler(make_params(0.8f, 40, 0.9f, 0.0f));
        std::vector<float> s(big);
        FusedInputs v = e;
        v.value[13'000] = kNaN;
        for (Sampler* which : {&sampler, &greedy}) {
            check(error_of([&] { v.fuse_and_sample(*which, s, 1.0f); }) ==
                      "NaN in value logits at index 13000",
                  "fused path: NaN in value names index 13000");
        }
        FusedInputs b = e;
        b.base[9001] = kNaN;
        for (const float alpha : {1.0f, 0.0f}) {
            check(error_of([&] { b.fuse_and_sample(sampler, s, alpha); }) ==
                      "NaN in base logits at index 9001",
                  "fused path: NaN in base names index 9001, alpha " + std::to_string(alpha));
        }
        FusedInputs m = e;
        m.token_map.assign(big, 0);
        m.token_map[17'777] = static_cast<int32_t>(big);
        check_throws("fused path: bad map entry names index 17777", "token_map[17777]",
                     [&] { m.fuse_and_sample(sampler, s, 1.0f); });
        FusedInputs none = e;
        none.base.assign(big, -kInf);
        for (Sampler* which : {&sampler, &greedy}) {
            check_throws("fused path: all -inf", "all logits are -inf",
                         [&] { none.fuse_and_sample(*which, s, 1.0f); });
        }
    });
}

}  // namespace

// --- the nucleus path (top_k 0, min-p): one scan, exact band, bounded tail -----------------

void nucleus_path() {
    const SamplerParams chat = make_params(0.8f, 0, 0.95f, 0.05f, 5);
    Rng rng(41);
    std::vector<float> llm = random_logits(rng, 262'144, 2.5);
    for (int i = 0; i < 20; ++i) llm[rng.integer(0, 262'144)] += 12.0f;
    check_probs_every_level("nucleus: chat settings on 262,144 logits", chat, llm,
                            chain_reference(llm, 0.8, 0, 0.95, 0.05));
    std::vector<float> holes = llm;
    for (auto& v : holes) {
        if (rng.uniform() < 0.3) v = -kInf;
    }
    const float best = *std::max_element(holes.begin(), holes.end()) + 1.0f;
    for (const int64_t i : {31, 32, 4095, 4096, 262'143}) holes[i] = best;  // ties across borders
    check_probs_every_level("nucleus: -inf holes and tied best tokens", chat, holes,
                            chain_reference(holes, 0.8, 0, 0.95, 0.05));

    // Peaked: the best alone reaches top-p while min-p keeps two; the tail (1.4e-3 over
    // 262,142 tokens) decides, through the bounds or through the chain.
    for (const double p_best : {0.951, 0.9499, 0.96}) {
        std::vector<double> probs(262'144, 0.0014 / 262'142);
        probs[70'000] = p_best;
        probs[123] = 0.0476;
        const std::vector<float> peaked = log_of(probs);
        const SamplerParams p = make_params(1.0f, 0, 0.95f, 0.05f);
        check_probs_every_level("nucleus: peaked, best " + std::to_string(p_best), p, peaked,
                                chain_reference(peaked, 1.0, 0, 0.95, 0.05));
    }

    // fuse_and_sample's chunked scan draws the tokens of fuse-then-sample (a partial block).
    const int64_t n = 262'144 - 5;
    std::vector<float> base(llm.begin(), llm.begin() + n), value = random_logits(rng, n, 1.0);
    for_each_level([&](const std::string& level) {
        std::vector<float> fused(n), scratch(n);
        fuse_logits(fused.data(), base.data(), n, value.data(), n, nullptr, 0.8f, nullptr);
        Sampler one(chat), two(chat);
        bool same = true;
        for (int step = 0; step < 20; ++step) {
            const int32_t a = fuse_and_sample(one, scratch.data(), base.data(), n, value.data(), n,
                                              nullptr, 0.8f, nullptr);
            same &= a == two.sample(fused.data(), n);
        }
        check(same, "nucleus: fuse_and_sample = fuse then sample [" + level + "]");
    });
}

void test_sampler() {
    tables();
    penalties();
    large_vocab_chains();
    seeded_draws();
    greedy();
    errors();
    fused_matches_fuse_then_sample();
    fused_ties_and_errors();
    nucleus_path();
}

}  // namespace ivl::test
