// test_kernels.cpp - the per-level scan kernels behind the sampler (kernels.h's table),
// called directly at every level and held to their exact contracts: first NaN, max, first
// index >= v (ties inside one vector), top-k heap offers, collect >= threshold, and
// exp_weights within 1 ulp of std::exp. The sampler tests see these only through
// probabilities at 1e-5, which a wrong lane or a perturbed exp would pass.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "core/kernels.h"

namespace ivl::test {

namespace {

using detail::active_kernels;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kLengths[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 257, 4099};

std::vector<float> scan_input(int64_t n, uint64_t seed) {
    Rng rng(seed);
    std::vector<float> x = random_logits(rng, n);
    for (auto& v : x) {
        if (rng.uniform() < 0.05) v = -kInf;
        if (rng.uniform() < 0.05) v = 4.0f;  // ties, often inside one vector
    }
    return x;
}

bool same(const std::vector<Candidate>& a, const std::vector<Candidate>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
        if (a[i].id != b[i].id || !(a[i].logit == b[i].logit)) return false;
    }
    return true;
}

void scans() {
    for_each_level([&](const std::string&) {
        const auto& k = active_kernels();
        for (const int64_t n : kLengths) {
            const std::string at = " n=" + std::to_string(n);
            const std::vector<float> x = scan_input(n, uint64_t(n) + 100);
            const float* p = x.data();

            float want_max = -kInf;
            for (const float v : x) want_max = std::max(want_max, v);
            check(k.max_value(p, n) == want_max, "max_value" + at);

            check(k.first_nan(p, n) == -1, "first_nan without NaN" + at);
            for (const int64_t where : {int64_t{0}, n / 2, n - 1, n - 2}) {
                if (where < 0 || where >= n) continue;
                std::vector<float> y = x;
                y[where] = std::numeric_limits<float>::quiet_NaN();
                if (where + 1 < n) y[n - 1] = std::numeric_limits<float>::quiet_NaN();
                check(k.first_nan(y.data(), n) == where,
                      "first_nan at " + std::to_string(where) + at);
            }

            for (const float v : {4.0f, want_max, 100.0f, -kInf}) {
                int64_t want = -1;
                for (int64_t i = 0; i < n; ++i) {
                    if (x[i] >= v) {
                        want = i;
                        break;
                    }
                }
                check(k.first_index_ge(p, n, v) == want,
                      "first_index_ge " + std::to_string(v) + at);
            }

            for (const float t : {4.0f, 0.0f, -2.0f, -kInf, std::numeric_limits<float>::lowest()}) {
                std::vector<Candidate> want, got;
                for (int64_t i = 0; i < n; ++i) {
                    if (x[i] >= t) want.push_back({static_cast<int32_t>(i), x[i]});
                }
                got.push_back({-7, 1.0f});  // appends after what is there
                k.collect_ge(p, n, t, got);
                want.insert(want.begin(), Candidate{-7, 1.0f});
                check(same(got, want), "collect_ge " + std::to_string(t) + at);
            }

            for (const size_t top : {size_t{1}, size_t{5}, size_t{40}}) {
                std::vector<Candidate> all;
                for (int64_t i = 0; i < n; ++i) {
                    if (x[i] > -kInf) all.push_back({static_cast<int32_t>(1000 + i), x[i]});
                }
                std::sort(all.begin(), all.end(), candidate_before);
                if (all.size() > top) all.resize(top);
                detail::TopKHeap heap(top);
                // two calls, as fuse_and_sample offers chunk by chunk
                k.top_k(p, n / 2, 1000, heap);
                k.top_k(p + n / 2, n - n / 2, 1000 + n / 2, heap);
                check(same(heap.take_sorted(), all), "top_k " + std::to_string(top) + at);
            }
        }
    });
}

void exp_weights() {
    for_each_level([&](const std::string&) {
        for (const int64_t n : kLengths) {
            Rng rng(uint64_t(n) + 200);
            std::vector<Candidate> items;
            for (int64_t i = 0; i < n; ++i) {
                // mostly ordinary logits, some near and past the vector range [-708, 709]
                const double r = rng.uniform();
                const double x = r < 0.8 ? -30.0 * rng.uniform() : -700.0 - 60.0 * rng.uniform();
                items.push_back({static_cast<int32_t>(i), static_cast<float>(x)});
            }
            for (const double top : {0.0, 2.5}) {
                std::vector<double> weights(n + 1, -1.0);
                const double total = active_kernels().exp_weights(items.data(), n, top,
                                                                  weights.data());
                bool ulp = weights[n] == -1.0;  // nothing written past n
                double sum = 0.0;
                std::string detail;
                for (int64_t i = 0; i < n; ++i) {
                    const double want = std::exp(static_cast<double>(items[i].logit) - top);
                    sum += want;
                    const double one_ulp = std::nextafter(want, 2.0 * want + 1.0) - want;
                    if (ulp && std::fabs(weights[i] - want) > one_ulp) {
                        ulp = false;
                        detail = "index " + std::to_string(i) + " logit " +
                                 std::to_string(items[i].logit);
                    }
                }
                const std::string at = " n=" + std::to_string(n) + " top=" + std::to_string(top);
                check(ulp, "exp_weights within 1 ulp of std::exp" + at, detail);
                check(std::fabs(total - sum) <= 1e-14 * sum, "exp_weights total" + at);
            }
        }
    });
}

// The block kernels behind fuse_terms_and_sample's bounds: block max (with NaN detection),
// an identity term's per-block reach, the bounds' assembly, and the float-exp band sum.
void block_kernels() {
    constexpr int64_t kBlock = detail::kScanBlock;
    for_each_level([&](const std::string&) {
        const auto& k = active_kernels();
        for (const int64_t n : {int64_t{1}, int64_t{31}, int64_t{32}, int64_t{33}, int64_t{255},
                                int64_t{256}, int64_t{257}, int64_t{4099}, int64_t{8192 + 40}}) {
            const std::string at = " n=" + std::to_string(n);
            const std::vector<float> x = scan_input(n, uint64_t(n) + 300);
            const int64_t n_blocks = (n + kBlock - 1) / kBlock;
            std::vector<float> want_max(n_blocks, -kInf), want_min(n_blocks, kInf);
            for (int64_t i = 0; i < n; ++i) {
                want_max[i / kBlock] = std::max(want_max[i / kBlock], x[i]);
                want_min[i / kBlock] = std::min(want_min[i / kBlock], x[i]);
            }
            std::vector<float> got(n_blocks + 1, 7.0f);
            check(k.block_max(x.data(), n, got.data()), "block_max without NaN" + at);
            check(std::equal(want_max.begin(), want_max.end(), got.begin()) && got[n_blocks] == 7.0f,
                  "block_max" + at);
            for (const int64_t where : {int64_t{0}, n / 2, n - 1}) {
                std::vector<float> y = x;
                y[where] = std::numeric_limits<float>::quiet_NaN();
                check(!k.block_max(y.data(), n, got.data()), "block_max sees a NaN" + at);
                std::vector<float> add_hi(n_blocks, 0.0f), add_lo(n_blocks, 0.0f);
                float largest = 0.0f;
                check(!k.block_term_range(y.data(), n, 1.0f, 0.0f, false, add_hi.data(),
                                          add_lo.data(), &largest),
                      "block_term_range sees a NaN" + at);
            }
            // An identity term's reach: c = weight * (z - shift) at the block's min and max,
            // also against 0 when weighted; the -inf entries of scan_input make it infinite.
            std::vector<float> z(n);
            Rng rng(uint64_t(n) + 400);
            for (auto& v : z) v = static_cast<float>(rng.normal() * 3.0);
            std::vector<float> z_max(n_blocks, -kInf), z_min(n_blocks, kInf);
            for (int64_t i = 0; i < n; ++i) {
                z_max[i / kBlock] = std::max(z_max[i / kBlock], z[i]);
                z_min[i / kBlock] = std::min(z_min[i / kBlock], z[i]);
            }
            for (const float weight : {0.8f, -1.5f}) {
                for (const bool weighted : {false, true}) {
                    std::vector<float> add_hi(n_blocks, 1.0f), add_lo(n_blocks, -1.0f);
                    float largest = 0.0f;
                    const bool ok = k.block_term_range(z.data(), n, weight, 0.25f, weighted,
                                                       add_hi.data(), add_lo.data(), &largest);
                    bool same_values = ok;
                    float want_largest = 0.0f;
                    for (int64_t b = 0; b < n_blocks; ++b) {
                        const float c1 = weight * (z_min[b] - 0.25f), c2 = weight * (z_max[b] - 0.25f);
                        float c_hi = std::max(c1, c2), c_lo = std::min(c1, c2);
                        if (weighted) {
                            c_hi = std::max(c_hi, 0.0f);
                            c_lo = std::min(c_lo, 0.0f);
                        }
                        same_values &= add_hi[b] == 1.0f + c_hi && add_lo[b] == -1.0f + c_lo;
                        want_largest = std::max({want_largest, std::fabs(c1), std::fabs(c2)});
                    }
                    check(same_values && largest == want_largest,
                          "block_term_range" + at + " weight " + std::to_string(weight) +
                              (weighted ? " weighted" : ""));
                }
            }
            std::vector<float> add_hi(n_blocks, 0.0f), add_lo(n_blocks, 0.0f);
            float largest = 0.0f;
            check(!k.block_term_range(x.data(), n, 1.0f, 0.0f, false, add_hi.data(),
                                      add_lo.data(), &largest) ||
                      std::find(x.begin(), x.end(), -kInf) == x.end(),
                  "block_term_range refuses infinite logits" + at);
            // block_bounds: the formula, element by element; infinite maxes kept.
            std::vector<float> hi = want_max, lo(n_blocks);
            k.block_bounds(hi.data(), lo.data(), z_max.data(), z_min.data(), n_blocks, 0.5f,
                           -0.5f, 0x1p-20f, 3.0f);
            bool formula = true;
            for (int64_t b = 0; b < n_blocks; ++b) {
                const float m = want_max[b];
                const float slack = 0x1p-20f * (std::fabs(m) + 3.0f) + 1e-37f;
                const bool finite = std::fabs(m) < kInf;
                formula &= hi[b] == (finite ? (m + (z_max[b] + 0.5f)) + slack : m) &&
                           lo[b] == (finite ? (m + (z_min[b] + -0.5f)) - slack : m);
            }
            check(formula, "block_bounds" + at);
            // sum_exp_band: [lo, hi) only, x / t in float, within 1e-5 per term of double.
            for (const float t : {1.0f, 0.7f}) {
                const float top = 4.0f / t;
                double want = 0.0;
                for (const float v : x) {
                    if (v >= -3.0f && v < 2.0f) {
                        want += std::exp(static_cast<double>(t == 1.0f ? v : v / t) - top);
                    }
                }
                const double sum = detail::sum_exp_band(x.data(), n, -3.0f, 2.0f, t, top);
                check(std::fabs(sum - want) <= 1e-5 * want + 1e-300,
                      "sum_exp_band" + at + " t=" + std::to_string(t));
            }
        }
    });
}

}  // namespace

void test_kernels() {
    scans();
    exp_weights();
    block_kernels();
}

}  // namespace ivl::test
