// sampler.cpp - the sampler chain steps, Sampler and fuse_and_sample.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "fuse.h"
#include "kernels.h"

namespace ivl {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Natural-log distance below the best token (in units of 1/temperature) past which a token
// cannot matter: n_vocab tokens at e^-(50 + ln n) each sum to e^-50 < 2^-72 of the best.
double negligible_log_ratio(int64_t n_vocab) {
    return 50.0 + std::log(static_cast<double>(std::max<int64_t>(n_vocab, 1)));
}

// The nucleus path keeps every token within this natural-log distance of the best (in units
// of 1/temperature) exactly; the rest only enter top-p's total, as bounds. e^-10: a few
// hundred tokens of an LLM's 262,144 at chat temperatures. min-p's bound must lie well
// inside it (min_p > e^-9).
constexpr double kNucleusLogRatio = 10.0;
// Relative widening of top-p's total before deciding its cut from bounds, far above the
// rounding of the chain's own sums: a cut that close to a boundary goes to the chain.
constexpr double kTotalSlack = 1e-12;
// sample_bounded's nucleus band, in units of the temperature beyond min-p's: wider fills
// more blocks, narrower leaves more of top-p's total to block bounds.
constexpr double kBoundedMargin = 1.0;
// Relative error of sum_exp_band against the chain's double exps (each term within 1e-5).
constexpr double kBandSlack = 2e-5;

void sort_canonical(CandidateSet& cs) {
    if (!cs.sorted) {
        std::sort(cs.items.begin(), cs.items.end(), candidate_before);
        cs.sorted = true;
    }
}

// Smallest and largest logit of `items` (+inf / -inf when empty). Four independent
// accumulators: a single min/max chain is latency-bound on 262,144 candidates.
std::pair<float, float> logit_range(const std::vector<Candidate>& items) {
    float lo[4] = {-kNegInf, -kNegInf, -kNegInf, -kNegInf};
    float hi[4] = {kNegInf, kNegInf, kNegInf, kNegInf};
    const size_t n = items.size();
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (size_t k = 0; k < 4; ++k) {
            const float x = items[i + k].logit;
            lo[k] = x < lo[k] ? x : lo[k];
            hi[k] = x > hi[k] ? x : hi[k];
        }
    }
    for (; i < n; ++i) {
        lo[0] = std::min(lo[0], items[i].logit);
        hi[0] = std::max(hi[0], items[i].logit);
    }
    return {std::min(std::min(lo[0], lo[1]), std::min(lo[2], lo[3])),
            std::max(std::max(hi[0], hi[1]), std::max(hi[2], hi[3]))};
}

float max_logit(const CandidateSet& cs) {
    if (cs.sorted && !cs.items.empty()) return cs.items.front().logit;
    return logit_range(cs.items).second;
}

// Unnormalised softmax weights exp(x - max) in double, and their sum.
double softmax_weights(const CandidateSet& cs, std::vector<double>& weights) {
    const double top = max_logit(cs);
    weights.resize(cs.items.size());
    return detail::active_kernels().exp_weights(cs.items.data(),
                                                static_cast<int64_t>(cs.items.size()), top,
                                                weights.data());
}

}  // namespace

namespace {
// The largest float at or below `threshold` (so no token at or above it is lost), and at
// least the lowest finite float (so -inf is never a candidate).
float round_down_threshold(double threshold) {
    float t = static_cast<float>(threshold);
    if (static_cast<double>(t) > threshold) t = std::nextafter(t, kNegInf);
    return std::max(t, std::numeric_limits<float>::lowest());
}
}  // namespace

void CandidateSet::make_sparse(double below_max) {
    if (!dense) return;
    const auto& kernels = detail::active_kernels();
    const float top = kernels.max_value(logits, n_vocab);
    if (!(top > kNegInf)) throw std::invalid_argument("all logits are -inf: nothing to sample");
    items.clear();
    kernels.collect_ge(logits, n_vocab, round_down_threshold(static_cast<double>(top) - below_max),
                       items);
    dense = false;
    sorted = false;
}

void NucleusScan::begin(int64_t n_vocab, double below) {
    below_max = below;
    top = kNegInf;
    const size_t n_blocks = static_cast<size_t>((n_vocab + detail::kScanBlock - 1) / detail::kScanBlock);
    block_max.resize(n_blocks);
    scanned.assign(n_blocks, 0);
    items.clear();
}

void NucleusScan::scan(const float* logits, int64_t i0, int64_t i1) {
    const auto& kernels = detail::active_kernels();
    // Until some logit is finite the bar comes from this range's own max (else everything
    // above -inf would be collected); after that, from the max so far.
    if (!(top > kNegInf)) top = kernels.max_value(logits + i0, i1 - i0);
    float* block_max_out = block_max.data() + i0 / detail::kScanBlock;
    kernels.scan_blocks(logits + i0, i1 - i0, i0,
                        round_down_threshold(static_cast<double>(top) - below_max), block_max_out,
                        items);
    const int64_t n_blocks = (i1 - i0 + detail::kScanBlock - 1) / detail::kScanBlock;
    for (int64_t b = 0; b < n_blocks; ++b) top = std::max(top, block_max_out[b]);
    std::fill_n(scanned.begin() + i0 / detail::kScanBlock, n_blocks, 1);
}

void SamplerChain::apply_from(CandidateSet& cs, size_t first_step) {
    for (size_t i = first_step; i < steps_.size(); ++i) steps_[i]->apply(cs);
}
void SamplerChain::accept(int32_t token) {
    for (auto& step : steps_) step->accept(token);
}
void SamplerChain::reset() {
    for (auto& step : steps_) step->reset();
}

// ---------------------------------------------------------------------------------------------
// Steps

// Repeat / presence / frequency penalties over the last `last_n` accepted tokens, as in
// llama.cpp: a seen token's logit is divided by repeat_penalty when positive (multiplied
// when not), then lowered by count * frequency_penalty + presence_penalty.
class PenaltiesStep : public SamplerStep {
public:
    PenaltiesStep(int32_t last_n, float repeat, float frequency, float presence)
        : last_n_(last_n), repeat_(repeat), frequency_(frequency), presence_(presence) {}

    bool will_edit() const {
        return last_n_ > 0 && !history_.empty() &&
               (repeat_ != 1.0f || frequency_ != 0.0f || presence_ != 0.0f);
    }

    void apply(CandidateSet& cs) override {
        if (!will_edit()) return;
        window_.assign(history_.begin(), history_.end());
        std::sort(window_.begin(), window_.end());
        for (size_t i = 0; i < window_.size();) {
            size_t j = i;
            while (j < window_.size() && window_[j] == window_[i]) ++j;
            penalise(cs, window_[i], static_cast<int>(j - i));
            i = j;
        }
    }

    void accept(int32_t token) override {
        if (last_n_ <= 0) return;
        history_.push_back(token);
        if (history_.size() > static_cast<size_t>(last_n_)) history_.erase(history_.begin());
    }

    void reset() override { history_.clear(); }

private:
    void penalise(CandidateSet& cs, int32_t id, int count) {
        if (id < 0 || id >= cs.n_vocab) return;
        float* logit = nullptr;
        if (cs.dense) {
            logit = &cs.logits[id];
        } else {
            for (auto& c : cs.items) {
                if (c.id == id) logit = &c.logit;
            }
            cs.sorted = false;
        }
        if (!logit) return;
        float x = *logit;
        x = x > 0.0f ? x / repeat_ : x * repeat_;
        x -= static_cast<float>(count) * frequency_ + presence_;
        *logit = x;
    }

    int32_t last_n_;
    float repeat_, frequency_, presence_;
    std::vector<int32_t> history_;  // oldest first, at most last_n_
    std::vector<int32_t> window_;
};

class TopKStep : public SamplerStep {
public:
    explicit TopKStep(int32_t k) : k_(k) {}
    void apply(CandidateSet& cs) override {
        if (k_ <= 0) return;
        const size_t k = static_cast<size_t>(k_);
        if (cs.dense) {
            detail::TopKHeap heap(std::min<int64_t>(k, cs.n_vocab));
            detail::active_kernels().top_k(cs.logits, cs.n_vocab, 0, heap);
            cs.items = heap.take_sorted();
            if (cs.items.empty()) {
                throw std::invalid_argument("all logits are -inf: nothing to sample");
            }
            cs.dense = false;
            cs.sorted = true;
        } else if (k < cs.items.size()) {
            std::partial_sort(cs.items.begin(), cs.items.begin() + k, cs.items.end(),
                              candidate_before);
            cs.items.resize(k);
            cs.sorted = true;
        }
    }

private:
    int32_t k_;
};

class TemperatureStep : public SamplerStep {
public:
    explicit TemperatureStep(float t) : t_(t) {}
    void apply(CandidateSet& cs) override {
        cs.make_sparse(negligible_log_ratio(cs.n_vocab) * t_);
        if (t_ == 1.0f) return;
        float top = -std::numeric_limits<float>::infinity();
        for (const auto& c : cs.items) top = std::max(top, c.logit);
        // A tiny temperature (1e-38) would overflow logit / t to +-inf and the softmax after it
        // to NaN: then divide the distance below the best logit instead (the same
        // distribution: the best at 0, the others finite or -inf).
        const bool overflow = std::isfinite(top) && !std::isfinite(top / t_);
        for (auto& c : cs.items) c.logit = overflow ? (c.logit - top) / t_ : c.logit / t_;
    }

private:
    float t_;
};

// Smallest set of best tokens whose probability mass reaches p (llama.cpp semantics: in
// canonical order, keep up to and including the first token where the cumulative
// probability is >= p). Small or sorted sets are sorted and scanned. Large unsorted sets
// (top-k off) are never sorted: one pass histograms the probability mass into kBuckets
// logit bands below the max; every band above the one where the mass crosses p is kept
// whole, and only that crossing band is sorted and scanned.
class TopPStep : public SamplerStep {
public:
    explicit TopPStep(float p) : p_(p) {}
    void apply(CandidateSet& cs) override {
        if (p_ >= 1.0f) return;
        cs.make_sparse(negligible_log_ratio(cs.n_vocab));
        if (cs.sorted || cs.items.size() <= kSortBelow) {
            sort_canonical(cs);
            const double total = softmax_weights(cs, weights_);
            const double target = static_cast<double>(p_) * total;
            double mass = 0.0;
            for (size_t i = 0; i < cs.items.size(); ++i) {
                mass += weights_[i];
                if (mass >= target) {
                    cs.items.resize(i + 1);
                    return;
                }
            }
            return;  // rounding kept us just under the target: keep everything
        }
        apply_by_bands(cs);
    }

private:
    static constexpr size_t kSortBelow = 512;
    static constexpr int kBuckets = 2048;

    void apply_by_bands(CandidateSet& cs) {
        auto& items = cs.items;
        const auto range = logit_range(items);
        const double top = range.second;
        const double bottom = range.first;
        weights_.resize(items.size());
        const double total = detail::active_kernels().exp_weights(
            items.data(), static_cast<int64_t>(items.size()), top, weights_.data());
        const double target = static_cast<double>(p_) * total;
        const double scale = top > bottom ? (kBuckets - 1) / (top - bottom) : 0.0;
        mass_.assign(kBuckets, 0.0);
        const auto band_of = [top, scale](float logit) {  // 0 = best band
            return static_cast<int>((top - logit) * scale);
        };
        for (size_t i = 0; i < items.size(); ++i) mass_[band_of(items[i].logit)] += weights_[i];
        int crossing = kBuckets - 1;
        double above = 0.0;  // mass of the bands before `crossing`
        for (int b = 0; b < kBuckets; ++b) {
            if (above + mass_[b] >= target) {
                crossing = b;
                break;
            }
            above += mass_[b];
        }
        // Keep whole bands above the crossing one (ids ascending), then the crossing band in
        // canonical order up to the target. Bands are recomputed (the same arithmetic) rather
        // than stored: cheaper than writing and re-reading one int per candidate.
        kept_.clear();
        edge_.clear();
        for (const auto& c : items) {
            const int b = band_of(c.logit);
            if (b < crossing) {
                kept_.push_back(c);
            } else if (b == crossing) {
                edge_.push_back(c);
            }
        }
        std::sort(edge_.begin(), edge_.end(), candidate_before);
        double mass = above;
        for (const auto& c : edge_) {
            kept_.push_back(c);
            mass += std::exp(static_cast<double>(c.logit) - top);
            if (mass >= target) break;
        }
        items.swap(kept_);
        cs.sorted = false;
    }

    float p_;
    std::vector<double> weights_, mass_;
    std::vector<Candidate> kept_, edge_;
};

// Keep tokens with probability >= min_p * the best token's.
class MinPStep : public SamplerStep {
public:
    explicit MinPStep(float p) : log_p_(std::log(static_cast<double>(p))), on_(p > 0.0f) {}
    void apply(CandidateSet& cs) override {
        if (!on_) return;
        cs.make_sparse(-log_p_);
        const double top = max_logit(cs);
        const double log_p = log_p_;
        cs.items.erase(std::remove_if(cs.items.begin(), cs.items.end(),
                                      [top, log_p](const Candidate& c) {
                                          return static_cast<double>(c.logit) - top < log_p;
                                      }),
                       cs.items.end());
    }

private:
    double log_p_;
    bool on_;
};

class DistStep : public SamplerStep {
public:
    explicit DistStep(uint64_t seed) : seed_(seed), rng_(seed) {}
    void apply(CandidateSet& cs) override {
        cs.make_sparse(negligible_log_ratio(cs.n_vocab));
        const double total = softmax_weights(cs, weights_);
        // Uniform double in [0, 1) from the top 53 bits: the same on every platform.
        const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
        const double target = u * total;
        double mass = 0.0;
        for (size_t i = 0; i < cs.items.size(); ++i) {
            mass += weights_[i];
            if (target < mass) {
                cs.selected = cs.items[i].id;
                return;
            }
        }
        cs.selected = cs.items.back().id;
    }
    void reset() override { rng_.seed(seed_); }

private:
    uint64_t seed_;
    std::mt19937_64 rng_;
    std::vector<double> weights_;
};

class GreedyStep : public SamplerStep {
public:
    void apply(CandidateSet& cs) override {
        if (cs.dense) {
            const auto& kernels = detail::active_kernels();
            const float top = kernels.max_value(cs.logits, cs.n_vocab);
            if (!(top > kNegInf)) {
                throw std::invalid_argument("all logits are -inf: nothing to sample");
            }
            cs.selected = static_cast<int32_t>(kernels.first_index_ge(cs.logits, cs.n_vocab, top));
            return;
        }
        if (cs.items.empty()) throw std::invalid_argument("no candidates left to sample");
        cs.selected = std::min_element(cs.items.begin(), cs.items.end(), candidate_before)->id;
    }
};

// ---------------------------------------------------------------------------------------------
// Sampler

Sampler::Sampler(const SamplerParams& p) : params_(p) {
    const auto require = [](bool ok, const char* message) {
        if (!ok) throw std::invalid_argument(std::string("invalid sampler setting: ") + message);
    };
    require(std::isfinite(p.temperature) && p.temperature >= 0.0f, "temperature must be >= 0");
    require(p.top_k >= 0, "top_k must be >= 0 (0 disables it)");
    require(p.top_p > 0.0f && p.top_p <= 1.0f, "top_p must be in (0, 1]");
    require(p.min_p >= 0.0f && p.min_p < 1.0f, "min_p must be in [0, 1)");
    require(std::isfinite(p.repeat_penalty) && p.repeat_penalty > 0.0f, "repeat_penalty must be > 0");
    require(p.repeat_last_n >= 0, "repeat_last_n must be >= 0");
    require(std::isfinite(p.presence_penalty), "presence_penalty must be finite");
    require(std::isfinite(p.frequency_penalty), "frequency_penalty must be finite");

    auto penalties = std::make_unique<PenaltiesStep>(p.repeat_last_n, p.repeat_penalty,
                                                     p.frequency_penalty, p.presence_penalty);
    penalties_ = penalties.get();
    filters_.add(std::move(penalties));
    if (greedy()) {
        draw_ = std::make_unique<GreedyStep>();  // top-k/top-p/min-p all keep the argmax
        return;
    }
    filters_.add(std::make_unique<TopKStep>(p.top_k));
    filters_.add(std::make_unique<TemperatureStep>(p.temperature));
    filters_.add(std::make_unique<TopPStep>(p.top_p));
    filters_.add(std::make_unique<MinPStep>(p.min_p));
    draw_ = std::make_unique<DistStep>(p.seed);
    nucleus_ = p.top_k == 0 && p.min_p > 0.0f &&
               -std::log(static_cast<double>(p.min_p)) < kNucleusLogRatio - 1.0;
}

Sampler::~Sampler() = default;

const float* Sampler::editable_copy(const float* logits, int64_t n_vocab, bool& copied) {
    const int64_t bad = detail::active_kernels().first_nan(logits, n_vocab);
    if (bad >= 0) throw std::invalid_argument("NaN in logits at index " + std::to_string(bad));
    copied = penalties_->will_edit();
    if (!copied) return logits;
    scratch_.resize(static_cast<size_t>(n_vocab));
    std::memcpy(scratch_.data(), logits, sizeof(float) * static_cast<size_t>(n_vocab));
    return scratch_.data();
}

void Sampler::reset_candidates(float* logits, int64_t n_vocab) {
    CandidateSet& cs = candidates_;
    cs.logits = logits;
    cs.n_vocab = n_vocab;
    cs.dense = true;
    cs.sorted = false;
    cs.items.clear();
    cs.selected = -1;
}

Sampler::Nucleus Sampler::finish_nucleus(CandidateSet& cs, bool cheap_bound_first) {
    const NucleusScan& scan = nucleus_scan_;
    const float top = scan.top;
    if (!(top > kNegInf)) throw std::invalid_argument("all logits are -inf: nothing to sample");
    const float t = params_.temperature;
    // +inf, or logits so large against t that x / t is coarse or overflows: the chain.
    if (!(std::fabs(static_cast<double>(top)) / t < 1e5)) return Nucleus::kChain;
    const float bar = round_down_threshold(static_cast<double>(top) - scan.below_max);
    // The chain's own truncation (TemperatureStep): tokens below it are not in any total.
    const float negligible =
        round_down_threshold(static_cast<double>(top) - negligible_log_ratio(cs.n_vocab) * t);
    const auto scaled = [t](float x) { return t == 1.0f ? x : x / t; };  // TemperatureStep's
    // kept: every token >= bar, a canonical prefix of the vocabulary. (Tokens the scan
    // collected below it, while the running max was lower, are dropped: what is decided here
    // must not depend on how the array was split into ranges.)
    std::vector<Candidate>& kept = cs.items;
    kept.clear();
    for (const auto& c : scan.items) {
        if (c.logit >= bar) kept.push_back({c.id, scaled(c.logit)});
    }
    const float top_scaled = scaled(top);
    // min-p's survivors (MinPStep's test), a prefix of kept in canonical order; top-p's cut
    // can only shorten it.
    const double log_p = std::log(static_cast<double>(params_.min_p));
    const auto survivors_end = std::partition(kept.begin(), kept.end(), [&](const Candidate& c) {
        return static_cast<double>(c.logit) - static_cast<double>(top_scaled) >= log_p;
    });
    std::sort(kept.begin(), survivors_end, candidate_before);
    const size_t n_survivors = static_cast<size_t>(survivors_end - kept.begin());
    size_t n_final = n_survivors;
    if (params_.top_p < 1.0f && n_survivors > 1) {
        const auto& kernels = detail::active_kernels();
        weights_.resize(kept.size());
        const double kept_total = kernels.exp_weights(
            kept.data(), static_cast<int64_t>(kept.size()), top_scaled, weights_.data());
        // weights_[0, n_survivors) now hold the survivors' weights, in canonical order.
        const double p = params_.top_p;
        const auto cut = [&](double total) {  // TopPStep's cut, at most n_survivors tokens
            const double target = p * total;
            double mass = 0.0;
            for (size_t i = 0; i < n_survivors; ++i) {
                mass += weights_[i];
                if (mass >= target) return i + 1;
            }
            return n_survivors;
        };
        // The total is kept_total plus the tokens in [negligible, bar) (those below count
        // nothing, as in the chain). A larger total only moves the cut later, so equal cuts
        // at both ends of an interval holding it decide it. Tried in turn: kept_total alone
        // (a lower end: the cut may already be past every survivor), then (cheap_bound_first)
        // each token at most min(its block's max, bar), then the scanned blocks' tokens
        // summed exactly and the others' bounded so.
        const auto block_bound = [&](size_t b) {  // 32 tokens at most min(block max, bar)
            const float v = std::min(scan.block_max[b], bar);
            return v >= negligible ? std::exp(static_cast<double>(scaled(v)) - top_scaled) : 0.0;
        };
        n_final = cut(kept_total * (1.0 - kTotalSlack));
        bool decided = n_final == n_survivors;
        if (!decided && cheap_bound_first) {
            bounds_.clear();
            for (size_t b = 0; b < scan.block_max.size(); ++b) {
                const float v = std::min(scan.block_max[b], bar);
                if (v >= negligible) bounds_.push_back({static_cast<int32_t>(b), scaled(v)});
            }
            bound_weights_.resize(bounds_.size());
            const double left_out =
                static_cast<double>(detail::kScanBlock) *
                kernels.exp_weights(bounds_.data(), static_cast<int64_t>(bounds_.size()),
                                    top_scaled, bound_weights_.data());
            decided = cut((kept_total + left_out) * (1.0 + kTotalSlack)) == n_final;
        }
        if (!decided) {
            // Scanned blocks exactly, in float: each exp within 1e-5 of the chain's double one
            // (sum_exp_band), so their true sum lies within kBandSlack of this.
            double exact = 0.0, bound = 0.0;
            const int64_t n_blocks = static_cast<int64_t>(scan.block_max.size());
            for (int64_t b = 0; b < n_blocks;) {
                if (!scan.scanned[b]) {
                    bound += block_bound(static_cast<size_t>(b++));
                    continue;
                }
                int64_t e = b + 1;
                while (e < n_blocks && scan.scanned[e]) ++e;
                const int64_t i0 = b * detail::kScanBlock;
                const int64_t i1 = std::min(cs.n_vocab, e * detail::kScanBlock);
                exact += detail::sum_exp_band(cs.logits + i0, i1 - i0, negligible, bar, t, top_scaled);
                b = e;
            }
            bound *= static_cast<double>(detail::kScanBlock);
            const double low = (kept_total + exact * (1.0 - kBandSlack)) * (1.0 - kTotalSlack);
            const double high = (kept_total + exact * (1.0 + kBandSlack) + bound) * (1.0 + kTotalSlack);
            n_final = cut(low);
            if (cut(high) != n_final) return bound > 0.0 ? Nucleus::kNeedTotal : Nucleus::kChain;
        }
    }
    kept.resize(n_final);
    cs.dense = false;
    cs.sorted = true;
    return Nucleus::kDone;
}

void Sampler::finish_nucleus_or_chain(CandidateSet& cs, bool cheap_bound_first,
                                      const std::function<void()>& fill_rest) {
    Nucleus result = finish_nucleus(cs, cheap_bound_first);
    if (result == Nucleus::kDone) return;
    fill_rest();
    if (result == Nucleus::kNeedTotal) result = finish_nucleus(cs, false);
    if (result != Nucleus::kDone) {  // every logit is filled: the chain on the dense array
        reset_candidates(cs.logits, cs.n_vocab);
        filters_.apply_from(cs, 1);  // after the penalties (applied, or nothing to apply)
    }
}

void Sampler::truncate(float* logits, int64_t n_vocab) {
    if (n_vocab <= 0) throw std::invalid_argument("empty logits");
    reset_candidates(logits, n_vocab);
    CandidateSet& cs = candidates_;
    if (!nucleus_) {
        filters_.apply(cs);
        return;
    }
    penalties_->apply(cs);  // on the dense array
    nucleus_scan_.begin(n_vocab, kNucleusLogRatio * params_.temperature);
    nucleus_scan_.scan(logits, 0, n_vocab);
    finish_nucleus_or_chain(cs, true, [] {});
}

int32_t Sampler::run(float* logits, int64_t n_vocab) {
    truncate(logits, n_vocab);
    draw_->apply(candidates_);
    return candidates_.selected;
}

int32_t Sampler::sample(const float* logits, int64_t n_vocab) {
    std::lock_guard<std::mutex> lock(mutex_);
    bool copied = false;
    // Without penalties to apply no step writes to a dense array, so the cast is safe.
    float* work = const_cast<float*>(editable_copy(logits, n_vocab, copied));
    return run(work, n_vocab);
}

int32_t Sampler::sample_in_place(float* logits, int64_t n_vocab) {
    std::lock_guard<std::mutex> lock(mutex_);
    return run(logits, n_vocab);
}

void Sampler::accept(int32_t token) {
    std::lock_guard<std::mutex> lock(mutex_);
    filters_.accept(token);
    draw_->accept(token);
}

void Sampler::reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    filters_.reset();
    draw_->reset();
}

std::vector<std::pair<int32_t, float>> Sampler::probs(const float* logits, int64_t n_vocab) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (n_vocab <= 0) throw std::invalid_argument("empty logits");
    bool copied = false;
    float* work = const_cast<float*>(editable_copy(logits, n_vocab, copied));
    truncate(work, n_vocab);
    CandidateSet& cs = candidates_;
    if (greedy()) {
        GreedyStep().apply(cs);
        return {{cs.selected, 1.0f}};
    }
    cs.make_sparse(negligible_log_ratio(n_vocab));
    sort_canonical(cs);  // a test/inspection path: the survivors are few in practice
    std::vector<double> weights;
    const double total = softmax_weights(cs, weights);
    std::vector<std::pair<int32_t, float>> out;
    out.reserve(cs.items.size());
    for (size_t i = 0; i < cs.items.size(); ++i) {
        out.emplace_back(cs.items[i].id, static_cast<float>(weights[i] / total));
    }
    return out;
}

int32_t Sampler::sample_filled(float* logits, int64_t n_vocab,
                               const std::function<void(int64_t, int64_t)>& fill) {
    std::lock_guard<std::mutex> lock(mutex_);
    return sample_filled_locked(logits, n_vocab, fill);
}

int32_t Sampler::sample_filled_locked(float* logits, int64_t n_vocab,
                                      const std::function<void(int64_t, int64_t)>& fill) {
    const bool fused_greedy = greedy();
    const bool fused_top_k = !fused_greedy && params_.top_k > 0;
    if (n_vocab <= 0 || penalties_->will_edit() || !(fused_greedy || fused_top_k || nucleus_)) {
        fill(0, n_vocab);
        return run(logits, n_vocab);
    }
    // Chunks of 16 KiB: filled, then scanned while in L1.
    constexpr int64_t kChunk = 4096;
    const auto& kernels = detail::active_kernels();
    reset_candidates(logits, n_vocab);
    CandidateSet& cs = candidates_;
    if (fused_greedy) {  // the GreedyStep on the dense array, chunk by chunk
        float best = kNegInf;
        int64_t best_id = -1;
        for (int64_t i0 = 0; i0 < n_vocab; i0 += kChunk) {
            const int64_t i1 = std::min(n_vocab, i0 + kChunk);
            fill(i0, i1);
            const float m = kernels.max_value(logits + i0, i1 - i0);
            if (m > best) {  // strictly: an equal max in a later chunk is a higher id
                best = m;
                best_id = i0 + kernels.first_index_ge(logits + i0, i1 - i0, m);
            }
        }
        if (!(best > kNegInf)) throw std::invalid_argument("all logits are -inf: nothing to sample");
        return static_cast<int32_t>(best_id);
    }
    if (nucleus_) {  // the nucleus scan, chunk by chunk: the same scan as on the whole array
        nucleus_scan_.begin(n_vocab, kNucleusLogRatio * params_.temperature);
        for (int64_t i0 = 0; i0 < n_vocab; i0 += kChunk) {
            const int64_t i1 = std::min(n_vocab, i0 + kChunk);
            fill(i0, i1);
            nucleus_scan_.scan(logits, i0, i1);
        }
        finish_nucleus_or_chain(cs, true, [] {});
        draw_->apply(cs);
        return cs.selected;
    }
    // The TopKStep on the dense array, chunk by chunk: the same offers in the same (id)
    // order, so the same heap; the chain then starts from its sorted top k.
    detail::TopKHeap heap(static_cast<size_t>(std::min<int64_t>(params_.top_k, n_vocab)));
    for (int64_t i0 = 0; i0 < n_vocab; i0 += kChunk) {
        const int64_t i1 = std::min(n_vocab, i0 + kChunk);
        fill(i0, i1);
        kernels.top_k(logits + i0, i1 - i0, i0, heap);
    }
    cs.items = heap.take_sorted();
    if (cs.items.empty()) throw std::invalid_argument("all logits are -inf: nothing to sample");
    cs.dense = false;
    cs.sorted = true;
    filters_.apply(cs);  // penalties: nothing to do; top-k: already k or fewer
    draw_->apply(cs);
    return cs.selected;
}

int32_t Sampler::sample_bounded(float* logits, int64_t n_vocab,
                                const std::function<bool(float*, float*)>& bound,
                                const std::function<void(int64_t, int64_t)>& fill) {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool fused_greedy = greedy();
    const bool fused_top_k = !fused_greedy && params_.top_k > 0;
    if (n_vocab <= 0 || penalties_->will_edit() || !(fused_greedy || fused_top_k || nucleus_)) {
        return sample_filled_locked(logits, n_vocab, fill);
    }
    constexpr int64_t kBlock = detail::kScanBlock;
    const int64_t n_blocks = (n_vocab + kBlock - 1) / kBlock;
    block_hi_.resize(static_cast<size_t>(n_blocks));
    block_lo_.resize(static_cast<size_t>(n_blocks));
    const float* hi = block_hi_.data();
    const float* lo = block_lo_.data();
    if (!bound(block_hi_.data(), block_lo_.data())) return sample_filled_locked(logits, n_vocab, fill);
    const auto& kernels = detail::active_kernels();
    const int64_t k = fused_greedy ? 1 : fused_top_k ? std::min<int64_t>(params_.top_k, n_vocab) : 1;
    // The nucleus band here: min-p's own plus a margin (the exact sums and block bounds of
    // finish_nucleus take care of top-p's total below it).
    const double band = fused_greedy || fused_top_k
                            ? 0.0
                            : (kBoundedMargin - std::log(static_cast<double>(params_.min_p))) *
                                  params_.temperature;
    const auto block_end = [n_vocab](int64_t b) { return std::min(n_vocab, (b + 1) * kBlock); };
    filled_.resize(static_cast<size_t>(n_blocks));  // all 0 between calls
    struct Clear {  // back to all 0 however this call ends (a fill may throw)
        std::vector<uint8_t>& flags;
        ~Clear() { std::fill(flags.begin(), flags.end(), 0); }
    } clear{filled_};
    // The bar: no token below it can survive the chain. Greedy and top-k: the k-th best token
    // (k = 1 greedy) is at least the k-th best lo (k blocks each hold a token that high).
    // Nucleus: the band below the best token, which is at least the best lo.
    double bar = -std::numeric_limits<double>::infinity();
    if (k <= n_blocks) {
        detail::TopKHeap lo_heap(static_cast<size_t>(k));
        kernels.top_k(lo, n_blocks, 0, lo_heap);
        bar = lo_heap.threshold();  // -inf until k finite lo's were offered
    }
    std::vector<Candidate>& blocks = block_list_;  // (block, its hi or lo), ids ascending
    if (bar > kNegInf) {
        // Raise it: fill the blocks the bar came from (lo >= bar; at least k of them) and take
        // the k-th best of their actual logits instead, which is at least as high.
        detail::TopKHeap heap(static_cast<size_t>(k));
        blocks.clear();
        kernels.collect_ge(lo, n_blocks, static_cast<float>(bar), blocks);
        for (const Candidate& c : blocks) {
            const int64_t i0 = c.id * kBlock;
            fill(i0, block_end(c.id));
            filled_[c.id] = 1;
            kernels.top_k(logits + i0, block_end(c.id) - i0, i0, heap);
        }
        bar = std::max(bar, static_cast<double>(heap.threshold()));
    }
    bar -= band;
    // The taken blocks: hi reaches the bar (-inf blocks never: they hold no token).
    blocks.clear();
    kernels.collect_ge(hi, n_blocks, round_down_threshold(bar), blocks);
    // Fills blocks [b0, b1) that are not filled yet, in ranges of consecutive ones.
    const auto fill_blocks = [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1;) {
            if (filled_[b]) {
                ++b;
                continue;
            }
            int64_t e = b + 1;
            while (e < b1 && !filled_[e]) ++e;
            fill(b * kBlock, block_end(e - 1));
            std::fill(filled_.begin() + b, filled_.begin() + e, 1);
            b = e;
        }
    };
    // Runs of consecutive taken blocks, at most 16 KiB: filled, then consumed while in L1.
    constexpr int64_t kRunBlocks = 4096 / kBlock;
    const auto for_each_run = [&](const auto& body) {
        for (size_t j = 0; j < blocks.size();) {
            const int64_t b = blocks[j].id;
            size_t e = j + 1;
            while (e < blocks.size() && blocks[e].id == blocks[e - 1].id + 1 &&
                   static_cast<int64_t>(e - j) < kRunBlocks) {
                ++e;
            }
            const int64_t b1 = b + static_cast<int64_t>(e - j);
            fill_blocks(b, b1);
            body(b * kBlock, block_end(b1 - 1));
            j = e;
        }
    };
    reset_candidates(logits, n_vocab);
    CandidateSet& cs = candidates_;
    if (fused_greedy) {  // as sample_filled: ids ascending, a later equal max loses
        float best = kNegInf;
        int64_t best_id = -1;
        for_each_run([&](int64_t i0, int64_t i1) {
            const float m = kernels.max_value(logits + i0, i1 - i0);
            if (m > best) {
                best = m;
                best_id = i0 + kernels.first_index_ge(logits + i0, i1 - i0, m);
            }
        });
        if (!(best > kNegInf)) throw std::invalid_argument("all logits are -inf: nothing to sample");
        return static_cast<int32_t>(best_id);
    }
    if (nucleus_) {  // a skipped block's max is at most its hi
        nucleus_scan_.begin(n_vocab, band);
        std::copy(hi, hi + n_blocks, nucleus_scan_.block_max.begin());
        for_each_run([&](int64_t i0, int64_t i1) { nucleus_scan_.scan(logits, i0, i1); });
        finish_nucleus_or_chain(cs, false, [&] {  // the rest, all below the bar: exact sums
            for (int64_t b = 0; b < n_blocks;) {
                if (nucleus_scan_.scanned[b]) {
                    ++b;
                    continue;
                }
                int64_t e = b + 1;
                while (e < n_blocks && !nucleus_scan_.scanned[e] && e - b < kRunBlocks) ++e;
                fill_blocks(b, e);
                nucleus_scan_.scan(logits, b * kBlock, block_end(e - 1));
                b = e;
            }
        });
        draw_->apply(cs);
        return cs.selected;
    }
    // Top-k: the heap gets the taken blocks' offers in id order; every token of a skipped
    // block is below k others, so the heap ends with the same k candidates.
    detail::TopKHeap heap(static_cast<size_t>(k));
    for_each_run([&](int64_t i0, int64_t i1) { kernels.top_k(logits + i0, i1 - i0, i0, heap); });
    cs.items = heap.take_sorted();
    if (cs.items.empty()) throw std::invalid_argument("all logits are -inf: nothing to sample");
    cs.dense = false;
    cs.sorted = true;
    filters_.apply(cs);
    draw_->apply(cs);
    return cs.selected;
}

int32_t fuse_and_sample(Sampler& sampler, float* scratch, const float* base_logits,
                        int64_t n_base, const float* value_logits, int64_t n_value,
                        const int32_t* token_map, float alpha, const float* token_weights) {
    detail::check_fuse_args(n_base, n_value, token_map, alpha);
    const detail::FuseArgs args{scratch, base_logits, value_logits, token_map, token_weights,
                                alpha, n_base, n_value};
    return sampler.sample_filled(scratch, n_base, [&args](int64_t i0, int64_t i1) {
        detail::fuse_chunk(args, i0, i1);
    });
}

}  // namespace ivl
