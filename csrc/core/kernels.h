// kernels.h - internal: the SIMD kernels behind fuse.h and sampler.h, one table per level.
//
// Each level (scalar, NEON, AVX2+FMA, AVX-512) fills a `Kernels` table; `active_kernels()`
// returns the one chosen once at start-up (or forced by set_simd_level). x86 variants are
// compiled with per-function target attributes, so the library itself needs no -march flag.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "candidates.h"

namespace ivl::detail {

// Arguments of one fuse: out[i] = base[i] + alpha * w[i] * value[map[i]].
struct FuseArgs {
    float* out;                    // n_base floats; may equal base (in place)
    const float* base;             // n_base
    const float* value;            // n_value
    const int32_t* token_map;      // n_base entries in [-1, n_value), or null = identity
    const float* token_weights;    // n_base, or null = all 1
    float alpha;                   // != 0 (alpha == 0 is a copy, handled by the caller)
    int64_t n_base;
    int64_t n_value;
    int64_t index0 = 0;            // added to indexes in error messages (a chunk of a larger fuse)
};

// The exact reference for out[i0..i1): SIMD levels run it on their tails and on any block
// whose fast path saw a NaN or a bad map entry. Throws std::invalid_argument with the index.
void fuse_scalar_range(const FuseArgs& args, int64_t i0, int64_t i1);

// Bounded selection of the k best candidates in canonical order (candidate_before).
// The front of the heap is the worst kept candidate; `threshold()` is the logit a new
// candidate must beat (strictly: scanning ids upwards, an equal logit never wins a tie).
class TopKHeap {
public:
    explicit TopKHeap(size_t k);
    float threshold() const { return threshold_; }
    void push(int32_t id, float logit);
    std::vector<Candidate> take_sorted();  // canonical order, empties the heap

private:
    size_t k_;
    float threshold_;
    std::vector<Candidate> heap_;
};

// Checks fuse_logits' arguments (sizes, finite alpha, identity sizes); throws
// std::invalid_argument.
void check_fuse_args(int64_t n_base, int64_t n_value, const int32_t* token_map, float alpha);

// fuse_logits restricted to out[i0..i1) of an already checked fuse `args` (alpha == 0
// included): errors name the absolute index. Lets a caller consume each fused chunk while
// it is still in L1 (fuse_and_sample's top-k / argmax).
void fuse_chunk(const FuseArgs& args, int64_t i0, int64_t i1);

struct Kernels {
    const char* name;
    void (*fuse)(const FuseArgs& args);
    // First index of a NaN in x[0..n), or -1.
    int64_t (*first_nan)(const float* x, int64_t n);
    // Largest value of NaN-free x[0..n); -inf when n == 0.
    float (*max_value)(const float* x, int64_t n);
    // First index i with x[i] >= v, or -1.
    int64_t (*first_index_ge)(const float* x, int64_t n, float v);
    // Offers every x[i] > heap.threshold() to the heap as id id0 + i, ids ascending.
    void (*top_k)(const float* x, int64_t n, int64_t id0, TopKHeap& heap);
    // Appends every (i, x[i]) with x[i] >= threshold to out, ids ascending.
    void (*collect_ge)(const float* x, int64_t n, float threshold, std::vector<Candidate>& out);
    // weights[i] = exp(double(items[i].logit) - top) for items whose logit <= top; returns
    // their sum. Within 1 ulp of std::exp on every level (the vector levels use their own
    // exp; the sum's association order is the level's own).
    double (*exp_weights)(const Candidate* items, int64_t n, double top, double* weights);
    // Per block of kScanBlock floats (the last may be shorter): its max into block_max[b]
    // (-inf for an all -inf block), and every (id0 + i, x[i]) with x[i] >= threshold appended
    // to out, ids ascending. x is NaN-free. One read of x (blocks below the threshold cost a
    // max-reduction and one compare).
    void (*scan_blocks)(const float* x, int64_t n, int64_t id0, float threshold, float* block_max,
                        std::vector<Candidate>& out);
    // Per block of kScanBlock floats (the last may be shorter): its max into block_max[b].
    // Returns false, block_max unspecified, when x holds a NaN.
    bool (*block_max)(const float* x, int64_t n, float* block_max);
    // The smallest and largest value of x[0..n) (n > 0) into *lo, *hi; false when x holds a
    // NaN (*lo, *hi unspecified).
    bool (*min_max)(const float* x, int64_t n, float* lo, float* hi);
    // An identity term's reach per block of kScanBlock logits z: with c1, c2 = weight * (the
    // block's min and max of z - shift) (in float), add_hi[b] += max(c1, c2) and add_lo[b] +=
    // min(c1, c2), each also against 0 when `weighted` (a token weight in [0, 1] may scale it
    // to 0); *largest = max(*largest, |c1|, |c2|). False, outputs unspecified, when z holds a
    // NaN or some c is infinite.
    bool (*block_term_range)(const float* z, int64_t n, float weight, float shift, bool weighted,
                             float* add_hi, float* add_lo, float* largest);
    // The fused logits' block bounds from the base's block maxes m = hi[b] (in place):
    //   hi[b] = (m + (add_hi[b] + up)) + s,  lo[b] = (m + (add_lo[b] + down)) - s,
    //   s = rel * (|m| + size) + 1e-37, for finite m; hi[b] = lo[b] = m otherwise.
    // add_hi / add_lo: per-block additions, or null (0).
    void (*block_bounds)(float* hi, float* lo, const float* add_hi, const float* add_lo,
                         int64_t n_blocks, float up, float down, float rel, float size);
};

constexpr int64_t kScanBlock = 32;

const Kernels& active_kernels();

// Sum over the x[i] in [lo, hi) of exp(double(x[i] / t) - top_scaled) (x[i] / t in float,
// as the sampler's TemperatureStep; x[i] itself when t == 1), for x[i] / t <= top_scaled + 64
// and >= top_scaled - 64, at the active level with a float exp: each term within 1e-5
// (relative) of the double one. Defined in fuse_terms.cpp, beside the other float exps.
double sum_exp_band(const float* x, int64_t n, float lo, float hi, float t, float top_scaled);

}  // namespace ivl::detail
