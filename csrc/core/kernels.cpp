// kernels.cpp - scalar, NEON, AVX2+FMA and AVX-512 kernels, and the run-time dispatch.
//
// x86: every SIMD function carries __attribute__((target(...))) and is only called after
// __builtin_cpu_supports said yes, so this file builds with the baseline -O3 flags.
// aarch64: NEON is part of the baseline ISA; no detection needed.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#define IVL_X86 1
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace ivl::detail {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

[[noreturn]] void throw_nan(const char* which, int64_t index) {
    throw std::invalid_argument(std::string("NaN in ") + which + " logits at index " +
                                std::to_string(index));
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// Reference semantics (also the slow path of every level)

void fuse_scalar_range(const FuseArgs& a, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
        const float b = a.base[i];
        if (b != b) throw_nan("base", i + a.index0);
        int64_t j = i;
        if (a.token_map) {
            j = a.token_map[i];
            if (j < -1 || j >= a.n_value) {
                throw std::invalid_argument("token_map[" + std::to_string(i + a.index0) + "] = " +
                                            std::to_string(j) + " is outside [-1, " +
                                            std::to_string(a.n_value) + ")");
            }
            if (j == -1) {
                a.out[i] = b;
                continue;
            }
        }
        const float v = a.value[j];
        if (v != v) throw_nan("value", a.token_map ? j : j + a.index0);
        const float c = a.token_weights ? a.alpha * a.token_weights[i] : a.alpha;
        if (c == 0.0f || std::isinf(b)) {  // a zero contribution adds nothing; inf base is kept
            a.out[i] = b;
            continue;
        }
        const float r = b + c * v;
        a.out[i] = (r != r) ? b : r;  // only an overflowed c times 0: treat as no contribution
    }
}

// ---------------------------------------------------------------------------------------------
// TopKHeap

TopKHeap::TopKHeap(size_t k) : k_(k), threshold_(kNegInf) { heap_.reserve(k + 1); }

namespace {
// Heap order: the front is the worst kept candidate (last in canonical order). A functor, so
// the heap algorithms inline it.
struct HeapLess {
    bool operator()(const Candidate& a, const Candidate& b) const { return candidate_before(a, b); }
};
}  // namespace

void TopKHeap::push(int32_t id, float logit) {
    if (k_ == 0) return;
    const Candidate c{id, logit};
    if (heap_.size() < k_) {
        if (!(logit > kNegInf)) return;  // -inf (and NaN) are never candidates
        heap_.push_back(c);
        std::push_heap(heap_.begin(), heap_.end(), HeapLess{});
    } else {
        if (!candidate_before(c, heap_.front())) return;
        // Replace the worst (the front) and sift it down: one pass instead of pop + push.
        // The kept set, hence take_sorted() and threshold(), is the same either way.
        const size_t n = heap_.size();
        size_t i = 0;
        for (;;) {
            size_t child = 2 * i + 1;
            if (child >= n) break;
            if (child + 1 < n && candidate_before(heap_[child], heap_[child + 1])) ++child;
            if (!candidate_before(c, heap_[child])) break;  // c is worse than both children
            heap_[i] = heap_[child];
            i = child;
        }
        heap_[i] = c;
    }
    if (heap_.size() == k_) threshold_ = heap_.front().logit;
}

std::vector<Candidate> TopKHeap::take_sorted() {
    std::sort_heap(heap_.begin(), heap_.end(), HeapLess{});
    std::vector<Candidate> out;
    out.swap(heap_);
    threshold_ = kNegInf;
    return out;
}

// ---------------------------------------------------------------------------------------------
// Scalar level (plain C++; blocks are written so the compiler can auto-vectorise them)

namespace {

constexpr int64_t kScalarBlock = 64;

template <bool kMapped, bool kWeighted>
void fuse_scalar_impl(const FuseArgs& a) {
    const int64_t n = a.n_base;
    const uint32_t n_value = static_cast<uint32_t>(a.n_value);
    float r[kScalarBlock];
    int64_t i = 0;
    for (; i + kScalarBlock <= n; i += kScalarBlock) {
        int bad = 0;
        for (int64_t k = 0; k < kScalarBlock; ++k) {
            float v;
            if (kMapped) {
                const int32_t j = a.token_map[i + k];
                const bool in_range = static_cast<uint32_t>(j) < n_value;
                bad |= !(in_range || j == -1);
                v = in_range ? a.value[j] : 0.0f;
            } else {
                v = a.value[i + k];
            }
            const float c = kWeighted ? a.alpha * a.token_weights[i + k] : a.alpha;
            r[k] = a.base[i + k] + c * v;
            bad |= (r[k] != r[k]);
        }
        if (bad) {
            fuse_scalar_range(a, i, i + kScalarBlock);
        } else {
            std::memcpy(a.out + i, r, sizeof(r));
        }
    }
    fuse_scalar_range(a, i, n);
}

void fuse_scalar(const FuseArgs& a) {
    if (a.token_map) {
        a.token_weights ? fuse_scalar_impl<true, true>(a) : fuse_scalar_impl<true, false>(a);
    } else {
        a.token_weights ? fuse_scalar_impl<false, true>(a) : fuse_scalar_impl<false, false>(a);
    }
}

int64_t first_nan_scalar(const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + kScalarBlock <= n; i += kScalarBlock) {
        int bad = 0;
        for (int64_t k = 0; k < kScalarBlock; ++k) bad |= (x[i + k] != x[i + k]);
        if (bad) break;
    }
    for (; i < n; ++i) {
        if (x[i] != x[i]) return i;
    }
    return -1;
}

float max_value_scalar(const float* x, int64_t n) {
    float m[8];
    std::fill(m, m + 8, kNegInf);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; ++k) m[k] = x[i + k] > m[k] ? x[i + k] : m[k];
    }
    float best = kNegInf;
    for (int k = 0; k < 8; ++k) best = m[k] > best ? m[k] : best;
    for (; i < n; ++i) best = x[i] > best ? x[i] : best;
    return best;
}

int64_t first_index_ge_scalar(const float* x, int64_t n, float v) {
    for (int64_t i = 0; i < n; ++i) {
        if (x[i] >= v) return i;
    }
    return -1;
}

void top_k_scalar(const float* x, int64_t n, int64_t id0, TopKHeap& heap) {
    constexpr int64_t kBlock = 16;
    float threshold = heap.threshold();
    int64_t i = 0;
    for (; i + kBlock <= n; i += kBlock) {
        int any = 0;
        for (int64_t k = 0; k < kBlock; ++k) any |= (x[i + k] > threshold);
        if (!any) continue;
        for (int64_t k = 0; k < kBlock; ++k) {
            if (x[i + k] > heap.threshold()) heap.push(static_cast<int32_t>(id0 + i + k), x[i + k]);
        }
        threshold = heap.threshold();
    }
    for (; i < n; ++i) {
        if (x[i] > heap.threshold()) heap.push(static_cast<int32_t>(id0 + i), x[i]);
    }
}

void collect_ge_scalar(const float* x, int64_t n, float threshold, std::vector<Candidate>& out) {
    for (int64_t i = 0; i < n; ++i) {
        if (x[i] >= threshold) out.push_back({static_cast<int32_t>(i), x[i]});
    }
}

void scan_blocks_scalar(const float* x, int64_t n, int64_t id0, float threshold, float* block_max,
                        std::vector<Candidate>& out) {
    for (int64_t i = 0; i < n; i += kScanBlock) {
        const int64_t len = std::min(kScanBlock, n - i);
        const float m = max_value_scalar(x + i, len);
        *block_max++ = m;
        if (!(m >= threshold)) continue;
        for (int64_t k = i; k < i + len; ++k) {
            if (x[k] >= threshold) out.push_back({static_cast<int32_t>(id0 + k), x[k]});
        }
    }
}

double exp_weights_scalar(const Candidate* items, int64_t n, double top, double* weights) {
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        weights[i] = std::exp(static_cast<double>(items[i].logit) - top);
        total += weights[i];
    }
    return total;
}

bool block_max_scalar(const float* x, int64_t n, float* block_max) {
    int bad = 0;
    for (int64_t i = 0; i < n; i += kScanBlock) {
        const int64_t len = std::min(kScanBlock, n - i);
        float m = kNegInf;
        for (int64_t k = i; k < i + len; ++k) {
            bad |= (x[k] != x[k]);
            m = x[k] > m ? x[k] : m;
        }
        *block_max++ = m;
    }
    return !bad;
}

bool min_max_scalar(const float* x, int64_t n, float* lo, float* hi) {
    float low[8], high[8];
    std::fill(low, low + 8, -kNegInf);
    std::fill(high, high + 8, kNegInf);
    int bad = 0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; ++k) {
            const float v = x[i + k];
            bad |= (v != v);
            low[k] = v < low[k] ? v : low[k];
            high[k] = v > high[k] ? v : high[k];
        }
    }
    for (; i < n; ++i) {
        bad |= (x[i] != x[i]);
        low[0] = x[i] < low[0] ? x[i] : low[0];
        high[0] = x[i] > high[0] ? x[i] : high[0];
    }
    *lo = *std::min_element(low, low + 8);
    *hi = *std::max_element(high, high + 8);
    return !bad;
}

// One block's part of block_term_range, from its min and max; false when infinite.
inline bool add_term_range(float z_min, float z_max, float weight, float shift, bool weighted,
                           float* add_hi, float* add_lo, float* largest) {
    const float c1 = weight * (z_min - shift), c2 = weight * (z_max - shift);
    float c_hi = std::max(c1, c2), c_lo = std::min(c1, c2);
    if (weighted) {
        c_hi = std::max(c_hi, 0.0f);
        c_lo = std::min(c_lo, 0.0f);
    }
    *add_hi += c_hi;
    *add_lo += c_lo;
    *largest = std::max(*largest, std::max(std::fabs(c1), std::fabs(c2)));
    return std::fabs(c1) < -kNegInf && std::fabs(c2) < -kNegInf;
}

bool block_term_range_scalar(const float* z, int64_t n, float weight, float shift, bool weighted,
                             float* add_hi, float* add_lo, float* largest) {
    bool ok = true;
    for (int64_t i = 0; i < n; i += kScanBlock) {
        const int64_t len = std::min(kScanBlock, n - i);
        float low = -kNegInf, high = kNegInf;
        int bad = 0;
        for (int64_t k = i; k < i + len; ++k) {
            bad |= (z[k] != z[k]);
            low = z[k] < low ? z[k] : low;
            high = z[k] > high ? z[k] : high;
        }
        ok &= !bad && add_term_range(low, high, weight, shift, weighted, add_hi++, add_lo++, largest);
    }
    return ok;
}

void block_bounds_scalar(float* hi, float* lo, const float* add_hi, const float* add_lo,
                         int64_t n_blocks, float up, float down, float rel, float size) {
    for (int64_t b = 0; b < n_blocks; ++b) {
        const float m = hi[b];
        const float slack = rel * (std::fabs(m) + size) + 1e-37f;
        const bool finite = std::fabs(m) < -kNegInf;
        const float a_hi = add_hi ? add_hi[b] + up : up;
        const float a_lo = add_lo ? add_lo[b] + down : down;
        hi[b] = finite ? (m + a_hi) + slack : m;
        lo[b] = finite ? (m + a_lo) - slack : m;
    }
}

const Kernels kScalar = {"scalar",         fuse_scalar,  first_nan_scalar,  max_value_scalar,
                         first_index_ge_scalar, top_k_scalar, collect_ge_scalar,
                         exp_weights_scalar, scan_blocks_scalar, block_max_scalar,
                         min_max_scalar, block_term_range_scalar, block_bounds_scalar};

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA

#if defined(IVL_X86)
#define IVL_AVX2 __attribute__((target("avx2,fma")))

// Fast path over blocks of 32 floats (4 vectors): results stay in registers until the
// block's accumulated NaN/map mask says it is clean; otherwise the block is redone by the
// reference (which still sees the original base, even in place).
//
// Mapped: lanes are loaded one by one (kHwGather = false) rather than with vgatherdps:
// measured on this project's AMD EPYC (Zen 3) dev box, equal or faster on random maps
// (e.g. 262,144 tokens: ~310 vs ~350-480 us under load), and the random cache misses
// dominate either way. -1 and out-of-range lanes read value[0] and are masked to 0.
template <bool kMapped, bool kWeighted, bool kHwGather = false>
IVL_AVX2 void fuse_avx2_impl(const FuseArgs& a) {
    const int64_t n = a.n_base;
    const __m256 alpha = _mm256_set1_ps(a.alpha);
    const __m256i minus_one = _mm256_set1_epi32(-1);
    const __m256i n_value = _mm256_set1_epi32(static_cast<int32_t>(a.n_value));
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 r[4];
        __m256 nan_mask = _mm256_setzero_ps();
        __m256i map_ok = _mm256_set1_epi32(-1);
        for (int u = 0; u < 4; ++u) {
            const int64_t j = i + 8 * u;
            const __m256 b = _mm256_loadu_ps(a.base + j);
            const __m256 c = kWeighted ? _mm256_mul_ps(alpha, _mm256_loadu_ps(a.token_weights + j))
                                       : alpha;
            __m256 v;
            if (kMapped) {
                const __m256i idx =
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.token_map + j));
                const __m256i in_range = _mm256_and_si256(_mm256_cmpgt_epi32(idx, minus_one),
                                                          _mm256_cmpgt_epi32(n_value, idx));
                map_ok = _mm256_and_si256(
                    map_ok, _mm256_or_si256(in_range, _mm256_cmpeq_epi32(idx, minus_one)));
                if (kHwGather) {
                    v = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), a.value, idx,
                                                 _mm256_castsi256_ps(in_range), 4);
                } else {
                    alignas(32) int32_t lane[8];
                    _mm256_store_si256(reinterpret_cast<__m256i*>(lane),
                                       _mm256_and_si256(idx, in_range));
                    const float* val = a.value;
                    v = _mm256_and_ps(_mm256_setr_ps(val[lane[0]], val[lane[1]], val[lane[2]],
                                                     val[lane[3]], val[lane[4]], val[lane[5]],
                                                     val[lane[6]], val[lane[7]]),
                                      _mm256_castsi256_ps(in_range));
                }
            } else {
                v = _mm256_loadu_ps(a.value + j);
            }
            r[u] = _mm256_fmadd_ps(c, v, b);
            nan_mask = _mm256_or_ps(nan_mask, _mm256_cmp_ps(r[u], r[u], _CMP_UNORD_Q));
        }
        const bool clean = _mm256_testz_ps(nan_mask, nan_mask) &&
                           (!kMapped || _mm256_movemask_epi8(map_ok) == -1);
        if (!clean) {
            fuse_scalar_range(a, i, i + 32);
            continue;
        }
        for (int u = 0; u < 4; ++u) _mm256_storeu_ps(a.out + i + 8 * u, r[u]);
    }
    fuse_scalar_range(a, i, n);
}

IVL_AVX2 void fuse_avx2(const FuseArgs& a) {
    if (a.token_map) {
        a.token_weights ? fuse_avx2_impl<true, true>(a) : fuse_avx2_impl<true, false>(a);
    } else {
        a.token_weights ? fuse_avx2_impl<false, true>(a) : fuse_avx2_impl<false, false>(a);
    }
}

IVL_AVX2 int64_t first_nan_avx2(const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 m = _mm256_setzero_ps();
        for (int u = 0; u < 4; ++u) {
            const __m256 v = _mm256_loadu_ps(x + i + 8 * u);
            m = _mm256_or_ps(m, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        if (!_mm256_testz_ps(m, m)) break;
    }
    for (; i < n; ++i) {
        if (x[i] != x[i]) return i;
    }
    return -1;
}

IVL_AVX2 float max_value_avx2(const float* x, int64_t n) {
    __m256 m0 = _mm256_set1_ps(kNegInf), m1 = m0, m2 = m0, m3 = m0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
        m2 = _mm256_max_ps(m2, _mm256_loadu_ps(x + i + 16));
        m3 = _mm256_max_ps(m3, _mm256_loadu_ps(x + i + 24));
    }
    const __m256 m = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    float best = kNegInf;
    for (float v : lanes) best = v > best ? v : best;
    for (; i < n; ++i) best = x[i] > best ? x[i] : best;
    return best;
}

IVL_AVX2 int64_t first_index_ge_avx2(const float* x, int64_t n, float value) {
    const __m256 v = _mm256_set1_ps(value);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), v, _CMP_GE_OQ));
        if (mask) return i + __builtin_ctz(static_cast<unsigned>(mask));
    }
    for (; i < n; ++i) {
        if (x[i] >= value) return i;
    }
    return -1;
}

IVL_AVX2 void top_k_avx2(const float* x, int64_t n, int64_t id0, TopKHeap& heap) {
    __m256 threshold = _mm256_set1_ps(heap.threshold());
    // Offers the lanes of x[i..i+16) above the threshold, ids ascending.
    const auto offer16 = [&](int64_t i) __attribute__((target("avx2,fma"))) {
        const unsigned lo = static_cast<unsigned>(
            _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), threshold, _CMP_GT_OQ)));
        const unsigned hi = static_cast<unsigned>(_mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(x + i + 8), threshold, _CMP_GT_OQ)));
        unsigned mask = lo | (hi << 8);
        if (!mask) return;
        while (mask) {
            const int64_t k = i + __builtin_ctz(mask);
            if (x[k] > heap.threshold()) heap.push(static_cast<int32_t>(id0 + k), x[k]);
            mask &= mask - 1;
        }
        threshold = _mm256_set1_ps(heap.threshold());
    };
    int64_t i = 0;
    // Blocks of 64: once the threshold has settled almost every block is below it, which one
    // max-reduction and one compare decide.
    for (; i + 64 <= n; i += 64) {
        __m256 m[4];
        for (int u = 0; u < 4; ++u) {
            m[u] = _mm256_max_ps(_mm256_loadu_ps(x + i + 16 * u),
                                 _mm256_loadu_ps(x + i + 16 * u + 8));
        }
        const __m256 all = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        if (!_mm256_movemask_ps(_mm256_cmp_ps(all, threshold, _CMP_GT_OQ))) continue;
        for (int u = 0; u < 4; ++u) offer16(i + 16 * u);
    }
    for (; i + 16 <= n; i += 16) offer16(i);
    for (; i < n; ++i) {
        if (x[i] > heap.threshold()) heap.push(static_cast<int32_t>(id0 + i), x[i]);
    }
}

IVL_AVX2 void collect_ge_avx2(const float* x, int64_t n, float threshold,
                              std::vector<Candidate>& out) {
    // Two passes: count (so the output is sized once, without a push_back per survivor),
    // then write; a block of 8 with every lane kept (the common case when the threshold is
    // far below the max) is written without a per-lane loop.
    const __m256 t = _mm256_set1_ps(threshold);
    const int64_t n8 = n & ~int64_t{7};
    int64_t count = 0;
    for (int64_t i = 0; i < n8; i += 8) {
        count += __builtin_popcount(static_cast<unsigned>(
            _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), t, _CMP_GE_OQ))));
    }
    for (int64_t i = n8; i < n; ++i) count += x[i] >= threshold;
    const size_t first = out.size();
    out.resize(first + static_cast<size_t>(count));
    Candidate* o = out.data() + first;
    const __m256i step = _mm256_set1_epi32(8);
    __m256i ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t i = 0; i < n8; i += 8, ids = _mm256_add_epi32(ids, step)) {
        const __m256 v = _mm256_loadu_ps(x + i);
        unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GE_OQ)));
        if (mask == 0xFF) {  // interleave (id, logit) pairs: 8 candidates = 64 bytes
            const __m256i lv = _mm256_castps_si256(v);
            const __m256i lo = _mm256_unpacklo_epi32(ids, lv);  // c0 c1 | c4 c5
            const __m256i hi = _mm256_unpackhi_epi32(ids, lv);  // c2 c3 | c6 c7
            __m256i* dst = reinterpret_cast<__m256i*>(o);
            _mm256_storeu_si256(dst, _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(lo, hi, 0x31));
            o += 8;
            continue;
        }
        while (mask) {
            const int64_t k = i + __builtin_ctz(mask);
            *o++ = {static_cast<int32_t>(k), x[k]};
            mask &= mask - 1;
        }
    }
    for (int64_t i = n8; i < n; ++i) {
        if (x[i] >= threshold) *o++ = {static_cast<int32_t>(i), x[i]};
    }
}

// exp(x) for 4 doubles in [-708, 709]: x = n ln2 + r, |r| <= ln2 / 2 (Cody-Waite, FMA),
// exp(r) by its Taylor series to r^13 (truncation < 2^-57; Estrin's scheme for the high
// terms, Horner for the last three), times 2^n built in the
// exponent field. Within 1 ulp of the correctly rounded result; lanes outside the range
// (deep underflow: subnormal or zero weights) are left to std::exp by the caller.
IVL_AVX2 inline __m256d exp_pd_avx2(__m256d x) {
    const __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
    static constexpr double kInvFact[] = {
        1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
        1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,
        1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,         0.5,
        1.0,                1.0};
#define c(k) _mm256_set1_pd(kInvFact[13 - (k)])  // 1 / k!
    const __m256d r2 = _mm256_mul_pd(r, r);
    const __m256d r4 = _mm256_mul_pd(r2, r2);
    const __m256d p3 = _mm256_fmadd_pd(c(4), r, c(3));
    const __m256d p5 = _mm256_fmadd_pd(c(6), r, c(5));
    const __m256d p7 = _mm256_fmadd_pd(c(8), r, c(7));
    const __m256d p9 = _mm256_fmadd_pd(c(10), r, c(9));
    const __m256d p11 = _mm256_fmadd_pd(c(12), r, c(11));
    const __m256d p13 = _mm256_fmadd_pd(c(13), r2, p11);                     // r^11..13
    const __m256d hi = _mm256_fmadd_pd(_mm256_fmadd_pd(p13, r2, p9), r4,     // r^7..13
                                       _mm256_fmadd_pd(p7, r2, p5));         // r^5..8
    __m256d p = _mm256_fmadd_pd(_mm256_fmadd_pd(hi, r2, p3), r, c(2));       // r^2..13 / r^2
    p = _mm256_fmadd_pd(p, r, c(1));
    p = _mm256_fmadd_pd(p, r, c(0));
#undef c
    // 2^n: n + 1023 lands in the low mantissa bits of (n + 1.5 * 2^52 + 1023); shift it
    // into the exponent field.
    const __m256d shifted = _mm256_add_pd(n, _mm256_set1_pd(6755399441055744.0 + 1023.0));
    const __m256d scale = _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_castpd_si256(shifted), 52));
    return _mm256_mul_pd(p, scale);
}

IVL_AVX2 double exp_weights_avx2(const Candidate* items, int64_t n, double top,
                                 double* weights) {
    const __m256d vtop = _mm256_set1_pd(top);
    const __m256d lo = _mm256_set1_pd(-708.0), hi = _mm256_set1_pd(709.0);
    const __m256i odd = _mm256_setr_epi32(1, 3, 5, 7, 0, 2, 4, 6);
    __m256d sum0 = _mm256_setzero_pd(), sum1 = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256d w[2];
        for (int u = 0; u < 2; ++u) {
            // 4 candidates = 8 int32 lanes (id, logit bits): the logits are the odd lanes.
            const __m256i raw =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(items + i + 4 * u));
            const __m128 logits = _mm256_castps256_ps128(
                _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(raw, odd)));
            const __m256d x = _mm256_sub_pd(_mm256_cvtps_pd(logits), vtop);
            const __m256d ok = _mm256_and_pd(_mm256_cmp_pd(x, lo, _CMP_GE_OQ),
                                             _mm256_cmp_pd(x, hi, _CMP_LE_OQ));
            if (_mm256_movemask_pd(ok) == 0xF) {
                w[u] = exp_pd_avx2(x);
            } else {
                alignas(32) double lanes[4];
                _mm256_store_pd(lanes, x);
                for (double& v : lanes) v = std::exp(v);
                w[u] = _mm256_load_pd(lanes);
            }
        }
        _mm256_storeu_pd(weights + i, w[0]);
        _mm256_storeu_pd(weights + i + 4, w[1]);
        sum0 = _mm256_add_pd(sum0, w[0]);
        sum1 = _mm256_add_pd(sum1, w[1]);
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(sum0, sum1));
    double total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for (; i < n; ++i) {
        weights[i] = std::exp(static_cast<double>(items[i].logit) - top);
        total += weights[i];
    }
    return total;
}

IVL_AVX2 void scan_blocks_avx2(const float* x, int64_t n, int64_t id0, float threshold,
                               float* block_max, std::vector<Candidate>& out) {
    static_assert(kScanBlock == 32, "4 vectors per block");
    const __m256 t = _mm256_set1_ps(threshold);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        const __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d));
        m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
        m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
        m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
        const float top = _mm256_cvtss_f32(m);
        *block_max++ = top;
        if (!(top >= threshold)) continue;
        const __m256 v[4] = {a, b, c, d};
        for (int u = 0; u < 4; ++u) {
            unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v[u], t, _CMP_GE_OQ)));
            while (mask) {
                const int64_t k = i + 8 * u + __builtin_ctz(mask);
                out.push_back({static_cast<int32_t>(id0 + k), x[k]});
                mask &= mask - 1;
            }
        }
    }
    if (i < n) scan_blocks_scalar(x + i, n - i, id0 + i, threshold, block_max, out);
}

// r[j] = the max (Max = _mm256_max_ps) or min of the 8 lanes of v[j]: a transposing
// reduction, 8 blocks' results in one vector.
template <__m256 (*Op)(__m256, __m256)>
IVL_AVX2 inline __m256 reduce8_avx2(const __m256* v) {
    const __m256 a01 = Op(_mm256_unpacklo_ps(v[0], v[1]), _mm256_unpackhi_ps(v[0], v[1]));
    const __m256 a23 = Op(_mm256_unpacklo_ps(v[2], v[3]), _mm256_unpackhi_ps(v[2], v[3]));
    const __m256 a45 = Op(_mm256_unpacklo_ps(v[4], v[5]), _mm256_unpackhi_ps(v[4], v[5]));
    const __m256 a67 = Op(_mm256_unpacklo_ps(v[6], v[7]), _mm256_unpackhi_ps(v[6], v[7]));
    const __m256 b03 = Op(_mm256_shuffle_ps(a01, a23, _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm256_shuffle_ps(a01, a23, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 b47 = Op(_mm256_shuffle_ps(a45, a67, _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm256_shuffle_ps(a45, a67, _MM_SHUFFLE(3, 2, 3, 2)));
    return Op(_mm256_permute2f128_ps(b03, b47, 0x20), _mm256_permute2f128_ps(b03, b47, 0x31));
}
IVL_AVX2 inline __m256 max8(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
IVL_AVX2 inline __m256 min8(__m256 a, __m256 b) { return _mm256_min_ps(a, b); }

IVL_AVX2 bool block_max_avx2(const float* x, int64_t n, float* block_max) {
    static_assert(kScanBlock == 32, "4 vectors per block");
    __m256 unordered = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 * 32 <= n; i += 8 * 32) {  // 8 blocks per round
        __m256 m[8];
        for (int j = 0; j < 8; ++j) {
            const float* p = x + i + 32 * j;
            const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
            const __m256 c = _mm256_loadu_ps(p + 16), d = _mm256_loadu_ps(p + 24);
            unordered = _mm256_or_ps(unordered, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q),
                                                             _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
            m[j] = _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d));
        }
        _mm256_storeu_ps(block_max, reduce8_avx2<max8>(m));
        block_max += 8;
    }
    const bool tail_ok = i >= n || block_max_scalar(x + i, n - i, block_max);
    return tail_ok && _mm256_movemask_ps(unordered) == 0;
}

IVL_AVX2 bool min_max_avx2(const float* x, int64_t n, float* lo, float* hi) {
    __m256 low0 = _mm256_set1_ps(-kNegInf), low1 = low0;
    __m256 high0 = _mm256_set1_ps(kNegInf), high1 = high0;
    __m256 unordered = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
        low0 = _mm256_min_ps(low0, a);
        low1 = _mm256_min_ps(low1, b);
        high0 = _mm256_max_ps(high0, a);
        high1 = _mm256_max_ps(high1, b);
    }
    float low[8], high[8];
    _mm256_storeu_ps(low, _mm256_min_ps(low0, low1));
    _mm256_storeu_ps(high, _mm256_max_ps(high0, high1));
    float tail_lo = -kNegInf, tail_hi = kNegInf;
    const bool tail_ok = i >= n || min_max_scalar(x + i, n - i, &tail_lo, &tail_hi);
    *lo = std::min(*std::min_element(low, low + 8), tail_lo);
    *hi = std::max(*std::max_element(high, high + 8), tail_hi);
    return tail_ok && _mm256_movemask_ps(unordered) == 0;
}

IVL_AVX2 bool block_term_range_avx2(const float* z, int64_t n, float weight, float shift,
                                    bool weighted, float* add_hi, float* add_lo, float* largest) {
    static_assert(kScanBlock == 32, "4 vectors per block");
    const __m256 w = _mm256_set1_ps(weight), vshift = _mm256_set1_ps(shift);
    const __m256 zero = _mm256_setzero_ps(), inf = _mm256_set1_ps(-kNegInf);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 unordered = zero, reach = zero, infinite = zero;
    int64_t i = 0;
    for (; i + 8 * 32 <= n; i += 8 * 32) {  // 8 blocks per round
        __m256 high[8], low[8];
        for (int j = 0; j < 8; ++j) {
            const float* p = z + i + 32 * j;
            const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
            const __m256 c = _mm256_loadu_ps(p + 16), d = _mm256_loadu_ps(p + 24);
            unordered = _mm256_or_ps(unordered, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q),
                                                             _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
            high[j] = _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d));
            low[j] = _mm256_min_ps(_mm256_min_ps(a, b), _mm256_min_ps(c, d));
        }
        // add_term_range on 8 blocks: the same float operations
        const __m256 c1 = _mm256_mul_ps(w, _mm256_sub_ps(reduce8_avx2<min8>(low), vshift));
        const __m256 c2 = _mm256_mul_ps(w, _mm256_sub_ps(reduce8_avx2<max8>(high), vshift));
        __m256 c_hi = _mm256_max_ps(c1, c2), c_lo = _mm256_min_ps(c1, c2);
        if (weighted) {
            c_hi = _mm256_max_ps(c_hi, zero);
            c_lo = _mm256_min_ps(c_lo, zero);
        }
        _mm256_storeu_ps(add_hi, _mm256_add_ps(_mm256_loadu_ps(add_hi), c_hi));
        _mm256_storeu_ps(add_lo, _mm256_add_ps(_mm256_loadu_ps(add_lo), c_lo));
        add_hi += 8;
        add_lo += 8;
        const __m256 m = _mm256_max_ps(_mm256_and_ps(c1, abs_mask), _mm256_and_ps(c2, abs_mask));
        reach = _mm256_max_ps(reach, m);
        infinite = _mm256_or_ps(infinite, _mm256_cmp_ps(m, inf, _CMP_NLT_UQ));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, reach);
    for (float v : lanes) *largest = std::max(*largest, v);
    bool ok = _mm256_movemask_ps(unordered) == 0 && _mm256_movemask_ps(infinite) == 0;
    if (i < n) {
        ok &= block_term_range_scalar(z + i, n - i, weight, shift, weighted, add_hi, add_lo, largest);
    }
    return ok;
}

IVL_AVX2 void block_bounds_avx2(float* hi, float* lo, const float* add_hi, const float* add_lo,
                                int64_t n_blocks, float up, float down, float rel, float size) {
    const __m256 vup = _mm256_set1_ps(up), vdown = _mm256_set1_ps(down);
    const __m256 vrel = _mm256_set1_ps(rel), vsize = _mm256_set1_ps(size);
    const __m256 tiny = _mm256_set1_ps(1e-37f), inf = _mm256_set1_ps(-kNegInf);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    int64_t b = 0;
    for (; b + 8 <= n_blocks; b += 8) {
        const __m256 m = _mm256_loadu_ps(hi + b);
        const __m256 magnitude = _mm256_and_ps(m, abs_mask);
        const __m256 slack = _mm256_add_ps(_mm256_mul_ps(vrel, _mm256_add_ps(magnitude, vsize)), tiny);
        const __m256 finite = _mm256_cmp_ps(magnitude, inf, _CMP_LT_OQ);
        const __m256 a_hi = add_hi ? _mm256_add_ps(_mm256_loadu_ps(add_hi + b), vup) : vup;
        const __m256 a_lo = add_lo ? _mm256_add_ps(_mm256_loadu_ps(add_lo + b), vdown) : vdown;
        const __m256 h = _mm256_add_ps(_mm256_add_ps(m, a_hi), slack);
        const __m256 l = _mm256_sub_ps(_mm256_add_ps(m, a_lo), slack);
        _mm256_storeu_ps(hi + b, _mm256_blendv_ps(m, h, finite));
        _mm256_storeu_ps(lo + b, _mm256_blendv_ps(m, l, finite));
    }
    block_bounds_scalar(hi + b, lo + b, add_hi ? add_hi + b : nullptr, add_lo ? add_lo + b : nullptr,
                        n_blocks - b, up, down, rel, size);
}

const Kernels kAvx2 = {"avx2",         fuse_avx2,    first_nan_avx2,  max_value_avx2,
                       first_index_ge_avx2, top_k_avx2, collect_ge_avx2, exp_weights_avx2,
                       scan_blocks_avx2, block_max_avx2, min_max_avx2, block_term_range_avx2,
                       block_bounds_avx2};

// ---------------------------------------------------------------------------------------------
// AVX-512F: its own fuse (16 lanes, mask-register gather); the scans reuse AVX2, which every
// AVX-512 CPU also has and which is already bound by memory there.

#define IVL_AVX512 __attribute__((target("avx512f")))

template <bool kMapped, bool kWeighted>
IVL_AVX512 void fuse_avx512_impl(const FuseArgs& a) {
    const int64_t n = a.n_base;
    const __m512 alpha = _mm512_set1_ps(a.alpha);
    const __m512i minus_one = _mm512_set1_epi32(-1);
    const __m512i n_value = _mm512_set1_epi32(static_cast<int32_t>(a.n_value));
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 r[2];
        __mmask16 nan_mask = 0;
        __mmask16 map_ok = 0xFFFF;
        for (int u = 0; u < 2; ++u) {
            const int64_t j = i + 16 * u;
            const __m512 b = _mm512_loadu_ps(a.base + j);
            const __m512 c = kWeighted ? _mm512_mul_ps(alpha, _mm512_loadu_ps(a.token_weights + j))
                                       : alpha;
            __m512 v;
            if (kMapped) {
                const __m512i idx = _mm512_loadu_si512(a.token_map + j);
                const __mmask16 in_range = _mm512_cmpgt_epi32_mask(idx, minus_one) &
                                           _mm512_cmpgt_epi32_mask(n_value, idx);
                map_ok &= in_range | _mm512_cmpeq_epi32_mask(idx, minus_one);
                v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in_range, idx, a.value, 4);
            } else {
                v = _mm512_loadu_ps(a.value + j);
            }
            r[u] = _mm512_fmadd_ps(c, v, b);
            nan_mask |= _mm512_cmp_ps_mask(r[u], r[u], _CMP_UNORD_Q);
        }
        if (nan_mask || (kMapped && map_ok != 0xFFFF)) {
            fuse_scalar_range(a, i, i + 32);
            continue;
        }
        _mm512_storeu_ps(a.out + i, r[0]);
        _mm512_storeu_ps(a.out + i + 16, r[1]);
    }
    fuse_scalar_range(a, i, n);
}

IVL_AVX512 void fuse_avx512(const FuseArgs& a) {
    if (a.token_map) {
        a.token_weights ? fuse_avx512_impl<true, true>(a) : fuse_avx512_impl<true, false>(a);
    } else {
        a.token_weights ? fuse_avx512_impl<false, true>(a) : fuse_avx512_impl<false, false>(a);
    }
}

const Kernels kAvx512 = {"avx512",        fuse_avx512,  first_nan_avx2,  max_value_avx2,
                         first_index_ge_avx2, top_k_avx2, collect_ge_avx2, exp_weights_avx2,
                         scan_blocks_avx2, block_max_avx2, min_max_avx2, block_term_range_avx2,
                       block_bounds_avx2};
#endif  // IVL_X86

// ---------------------------------------------------------------------------------------------
// NEON (aarch64): its own fuse (4 lanes x 4, lane-by-lane gather: NEON has no gather);
// the scans use the scalar code, which the compiler vectorises for NEON.

#if defined(__aarch64__)
template <bool kMapped, bool kWeighted>
void fuse_neon_impl(const FuseArgs& a) {
    const int64_t n = a.n_base;
    const float32x4_t alpha = vdupq_n_f32(a.alpha);
    const uint32_t n_value = static_cast<uint32_t>(a.n_value);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        float32x4_t r[4];
        uint32x4_t ordered = vdupq_n_u32(0xFFFFFFFFu);
        bool map_ok = true;
        for (int u = 0; u < 4; ++u) {
            const int64_t j = i + 4 * u;
            const float32x4_t b = vld1q_f32(a.base + j);
            const float32x4_t c = kWeighted ? vmulq_f32(alpha, vld1q_f32(a.token_weights + j)) : alpha;
            float32x4_t v;
            if (kMapped) {
                float lanes[4];
                for (int k = 0; k < 4; ++k) {
                    const int32_t m = a.token_map[j + k];
                    const bool in_range = static_cast<uint32_t>(m) < n_value;
                    map_ok &= in_range || m == -1;
                    lanes[k] = in_range ? a.value[m] : 0.0f;
                }
                v = vld1q_f32(lanes);
            } else {
                v = vld1q_f32(a.value + j);
            }
            r[u] = vfmaq_f32(b, c, v);
            ordered = vandq_u32(ordered, vceqq_f32(r[u], r[u]));
        }
        if (vminvq_u32(ordered) == 0 || !map_ok) {
            fuse_scalar_range(a, i, i + 16);
            continue;
        }
        for (int u = 0; u < 4; ++u) vst1q_f32(a.out + i + 4 * u, r[u]);
    }
    fuse_scalar_range(a, i, n);
}

void fuse_neon(const FuseArgs& a) {
    if (a.token_map) {
        a.token_weights ? fuse_neon_impl<true, true>(a) : fuse_neon_impl<true, false>(a);
    } else {
        a.token_weights ? fuse_neon_impl<false, true>(a) : fuse_neon_impl<false, false>(a);
    }
}

const Kernels kNeon = {"neon",          fuse_neon,    first_nan_scalar,  max_value_scalar,
                       first_index_ge_scalar, top_k_scalar, collect_ge_scalar,
                       exp_weights_scalar, scan_blocks_scalar, block_max_scalar, min_max_scalar,
                       block_term_range_scalar, block_bounds_scalar};
#endif  // __aarch64__

// ---------------------------------------------------------------------------------------------
// Dispatch

std::vector<const Kernels*> supported_levels() {
    std::vector<const Kernels*> levels{&kScalar};
#if defined(IVL_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        levels.push_back(&kAvx2);
        if (__builtin_cpu_supports("avx512f")) levels.push_back(&kAvx512);
    }
#endif
#if defined(__aarch64__)
    levels.push_back(&kNeon);
#endif
    return levels;
}

const std::vector<const Kernels*>& levels() {
    static const std::vector<const Kernels*> all = supported_levels();
    return all;
}

std::atomic<const Kernels*>& active_slot() {
    static std::atomic<const Kernels*> slot{levels().back()};
    return slot;
}

}  // namespace

const Kernels& active_kernels() { return *active_slot().load(std::memory_order_relaxed); }

}  // namespace ivl::detail

namespace ivl {

std::vector<std::string> available_simd_levels() {
    std::vector<std::string> names;
    for (const auto* k : detail::levels()) names.emplace_back(k->name);
    return names;
}

std::string simd_level() { return detail::active_kernels().name; }

void set_simd_level(const std::string& level) {
    const auto& all = detail::levels();
    if (level == "auto") {
        detail::active_slot().store(all.back());
        return;
    }
    for (const auto* k : all) {
        if (level == k->name) {
            detail::active_slot().store(k);
            return;
        }
    }
    std::string names = "auto";
    for (const auto* k : all) names += std::string(", ") + k->name;
    throw std::invalid_argument("SIMD level '" + level + "' is not available on this CPU (" +
                                names + ")");
}

}  // namespace ivl
