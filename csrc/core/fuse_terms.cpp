// fuse_terms.cpp - fuse_terms: argument checks, the log-softmax shifts, the plausibility
// mask, and the per-term gather + FMA and sum-of-exp kernels at every SIMD level.
//
// The active level is the one kernels.cpp chose (set_simd_level); this file keeps its own
// small table per level, picked by that level's name. x86 variants carry target attributes
// and run only where kernels.cpp's dispatch found the feature, as there.
#include "fuse_terms.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "sampler.h"

#if defined(__x86_64__) || defined(__i386__)
#define IVL_X86 1
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace ivl {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// One term's pass over out[i0..i1): acc[i] += c * (z[map[i]] - shift), the rules of
// fuse_terms.h. Indexes are absolute: no per-chunk copies of these arguments.
struct TermArgs {
    float* acc;                  // n_base: base plus the earlier terms
    const float* base;           // n_base: read on the slow path (infinite base is kept)
    const float* logits;         // n_logits
    const int32_t* token_map;    // or null = identity
    const float* token_weights;  // or null = all 1
    float weight;                // != 0
    float shift;                 // logsumexp(z) (kLogSoftmax) or 0
    int64_t n_logits;
    int term;                    // its index, for error messages
};

// ---------------------------------------------------------------------------------------------
// Reference semantics (also the slow path of every level)

void term_scalar_range(const TermArgs& a, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
        int64_t j = i;
        if (a.token_map) {
            j = a.token_map[i];
            if (j < -1 || j >= a.n_logits) {
                throw std::invalid_argument("term " + std::to_string(a.term) + ": token_map[" +
                                            std::to_string(i) + "] = " + std::to_string(j) +
                                            " is outside [-1, " + std::to_string(a.n_logits) + ")");
            }
            if (j == -1) continue;
        }
        const float v = a.logits[j];
        if (v != v) {
            throw std::invalid_argument("NaN in term " + std::to_string(a.term) +
                                        " logits at index " + std::to_string(j));
        }
        const float c = a.token_weights ? a.weight * a.token_weights[i] : a.weight;
        if (c == 0.0f) continue;  // a zero contribution, even times +-inf
        const float b = a.base[i];
        if (std::isinf(b)) {  // an infinite base is kept
            a.acc[i] = b;
            continue;
        }
        const float r = a.acc[i] + c * (v - a.shift);
        a.acc[i] = (r != r) ? -kInf : r;  // opposite infinities: -inf wins
    }
}

// exp(x) in float for x <= 0, for sum_exp: Cody-Waite reduction and Cephes' expf polynomial
// (within 2 ulp of expf); x < -87 gives 0 (the sum it joins is >= 1: such terms vanish in
// its double either way). kernels.cpp's exp is double and 4x the work: too slow for a pass
// over a 262,144-entry vocabulary.
constexpr float kExpLo = -87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

// ---------------------------------------------------------------------------------------------
// Scalar level (blocks the compiler can auto-vectorise; std::exp for the sum)

constexpr int64_t kScalarBlock = 64;

template <bool kMapped, bool kWeighted>
void term_scalar_impl(const TermArgs& a, int64_t i0, int64_t i1) {
    const uint32_t n_logits = static_cast<uint32_t>(a.n_logits);
    float r[kScalarBlock];
    int64_t i = i0;
    for (; i + kScalarBlock <= i1; i += kScalarBlock) {
        int bad = 0;
        for (int64_t k = 0; k < kScalarBlock; ++k) {
            float x;
            if (kMapped) {
                const int32_t j = a.token_map[i + k];
                const bool in_range = static_cast<uint32_t>(j) < n_logits;
                bad |= !(in_range || j == -1);
                x = in_range ? a.logits[j] - a.shift : 0.0f;
            } else {
                x = a.logits[i + k] - a.shift;
            }
            const float c = kWeighted ? a.weight * a.token_weights[i + k] : a.weight;
            r[k] = a.acc[i + k] + c * x;
            bad |= (r[k] != r[k]);
        }
        if (bad) {
            term_scalar_range(a, i, i + kScalarBlock);
        } else {
            std::memcpy(a.acc + i, r, sizeof(r));
        }
    }
    term_scalar_range(a, i, i1);
}

double sum_exp_scalar(const float* x, int64_t n, float top) {
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const float d = x[i] - top;
        total += d >= kExpLo ? static_cast<double>(std::exp(d)) : 0.0;
    }
    return total;
}

double sum_exp_band_scalar(const float* x, int64_t n, float lo, float hi, float t, float top) {
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const float v = x[i];
        if (!(v >= lo && v < hi)) continue;
        const float d = (t == 1.0f ? v : v / t) - top;
        total += d >= kExpLo ? static_cast<double>(std::exp(d)) : 0.0;
    }
    return total;
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: blocks of 32 (4 vectors), lane-by-lane gathers as kernels.cpp's fuse_avx2
// (measured there: no slower than vgatherdps on random maps).

#if defined(IVL_X86)
#define IVL_AVX2 __attribute__((target("avx2,fma")))

template <bool kMapped, bool kWeighted>
IVL_AVX2 void term_avx2_impl(const TermArgs& a, int64_t i0, int64_t i1) {
    const __m256 weight = _mm256_set1_ps(a.weight);
    const __m256 shift = _mm256_set1_ps(a.shift);
    const __m256i minus_one = _mm256_set1_epi32(-1);
    const __m256i n_logits = _mm256_set1_epi32(static_cast<int32_t>(a.n_logits));
    int64_t i = i0;
    for (; i + 32 <= i1; i += 32) {
        __m256 r[4];
        __m256 nan_mask = _mm256_setzero_ps();
        __m256i map_ok = _mm256_set1_epi32(-1);
        for (int u = 0; u < 4; ++u) {
            const int64_t j = i + 8 * u;
            const __m256 c = kWeighted ? _mm256_mul_ps(weight, _mm256_loadu_ps(a.token_weights + j))
                                       : weight;
            __m256 x;
            if (kMapped) {
                const __m256i idx =
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.token_map + j));
                const __m256i in_range = _mm256_and_si256(_mm256_cmpgt_epi32(idx, minus_one),
                                                          _mm256_cmpgt_epi32(n_logits, idx));
                map_ok = _mm256_and_si256(
                    map_ok, _mm256_or_si256(in_range, _mm256_cmpeq_epi32(idx, minus_one)));
                alignas(32) int32_t lane[8];
                _mm256_store_si256(reinterpret_cast<__m256i*>(lane), _mm256_and_si256(idx, in_range));
                const float* z = a.logits;
                const __m256 v = _mm256_setr_ps(z[lane[0]], z[lane[1]], z[lane[2]], z[lane[3]],
                                                z[lane[4]], z[lane[5]], z[lane[6]], z[lane[7]]);
                x = _mm256_and_ps(_mm256_sub_ps(v, shift), _mm256_castsi256_ps(in_range));
            } else {
                x = _mm256_sub_ps(_mm256_loadu_ps(a.logits + j), shift);
            }
            r[u] = _mm256_fmadd_ps(c, x, _mm256_loadu_ps(a.acc + j));
            nan_mask = _mm256_or_ps(nan_mask, _mm256_cmp_ps(r[u], r[u], _CMP_UNORD_Q));
        }
        const bool clean = _mm256_testz_ps(nan_mask, nan_mask) &&
                           (!kMapped || _mm256_movemask_epi8(map_ok) == -1);
        if (!clean) {
            term_scalar_range(a, i, i + 32);
            continue;
        }
        for (int u = 0; u < 4; ++u) _mm256_storeu_ps(a.acc + i + 8 * u, r[u]);
    }
    term_scalar_range(a, i, i1);
}

IVL_AVX2 inline __m256 exp_ps_avx2(__m256 x) {
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

IVL_AVX2 double sum_exp_avx2(const float* x, int64_t n, float top) {
    const __m256 vtop = _mm256_set1_ps(top), lo = _mm256_set1_ps(kExpLo);
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 e[2];
        for (int u = 0; u < 2; ++u) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8 * u), vtop);
            const __m256 ok = _mm256_cmp_ps(d, lo, _CMP_GE_OQ);
            e[u] = _mm256_and_ps(exp_ps_avx2(_mm256_max_ps(d, lo)), ok);
        }
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e[0])));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e[0], 1)));
        s2 = _mm256_add_pd(s2, _mm256_cvtps_pd(_mm256_castps256_ps128(e[1])));
        s3 = _mm256_add_pd(s3, _mm256_cvtps_pd(_mm256_extractf128_ps(e[1], 1)));
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + sum_exp_scalar(x + i, n - i, top);
}

IVL_AVX2 double sum_exp_band_avx2(const float* x, int64_t n, float lo, float hi, float t,
                                  float top) {
    const __m256 vtop = _mm256_set1_ps(top), exp_lo = _mm256_set1_ps(kExpLo);
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), vt = _mm256_set1_ps(t);
    const bool scale = t != 1.0f;
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 in_band = _mm256_and_ps(_mm256_cmp_ps(v, vlo, _CMP_GE_OQ),
                                             _mm256_cmp_ps(v, vhi, _CMP_LT_OQ));
        if (_mm256_movemask_ps(in_band) == 0) continue;
        const __m256 d = _mm256_sub_ps(scale ? _mm256_div_ps(v, vt) : v, vtop);
        const __m256 ok = _mm256_and_ps(in_band, _mm256_cmp_ps(d, exp_lo, _CMP_GE_OQ));
        const __m256 e = _mm256_and_ps(exp_ps_avx2(_mm256_max_ps(d, exp_lo)), ok);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(s0, s1));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) +
           sum_exp_band_scalar(x + i, n - i, lo, hi, t, top);
}

// ---------------------------------------------------------------------------------------------
// AVX-512F: 16 lanes, mask-register gather.

#define IVL_AVX512 __attribute__((target("avx512f")))
// GCC 12 flags the _mm512_undefined_* operand inside unmasked intrinsics (roundscale,
// cvtps_epi32, cvtps_pd, ...) as uninitialised once inlined under a target attribute: a
// false positive (the operand is fully masked off).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

template <bool kMapped, bool kWeighted>
IVL_AVX512 void term_avx512_impl(const TermArgs& a, int64_t i0, int64_t i1) {
    const __m512 weight = _mm512_set1_ps(a.weight);
    const __m512 shift = _mm512_set1_ps(a.shift);
    const __m512i minus_one = _mm512_set1_epi32(-1);
    const __m512i n_logits = _mm512_set1_epi32(static_cast<int32_t>(a.n_logits));
    int64_t i = i0;
    for (; i + 32 <= i1; i += 32) {
        __m512 r[2];
        __mmask16 nan_mask = 0;
        __mmask16 map_ok = 0xFFFF;
        for (int u = 0; u < 2; ++u) {
            const int64_t j = i + 16 * u;
            const __m512 c = kWeighted ? _mm512_mul_ps(weight, _mm512_loadu_ps(a.token_weights + j))
                                       : weight;
            __m512 x;
            if (kMapped) {
                const __m512i idx = _mm512_loadu_si512(a.token_map + j);
                const __mmask16 in_range = _mm512_cmpgt_epi32_mask(idx, minus_one) &
                                           _mm512_cmpgt_epi32_mask(n_logits, idx);
                map_ok &= in_range | _mm512_cmpeq_epi32_mask(idx, minus_one);
                const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in_range, idx,
                                                          a.logits, 4);
                x = _mm512_maskz_sub_ps(in_range, v, shift);
            } else {
                x = _mm512_sub_ps(_mm512_loadu_ps(a.logits + j), shift);
            }
            r[u] = _mm512_fmadd_ps(c, x, _mm512_loadu_ps(a.acc + j));
            nan_mask |= _mm512_cmp_ps_mask(r[u], r[u], _CMP_UNORD_Q);
        }
        if (nan_mask || (kMapped && map_ok != 0xFFFF)) {
            term_scalar_range(a, i, i + 32);
            continue;
        }
        _mm512_storeu_ps(a.acc + i, r[0]);
        _mm512_storeu_ps(a.acc + i + 16, r[1]);
    }
    term_scalar_range(a, i, i1);
}

IVL_AVX512 inline __m512 exp_ps_avx512(__m512 x) {
    const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kP0), r, _mm512_set1_ps(kP1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

IVL_AVX512 double sum_exp_avx512(const float* x, int64_t n, float top) {
    const __m512 vtop = _mm512_set1_ps(top), lo = _mm512_set1_ps(kExpLo);
    __m512d s0 = _mm512_setzero_pd(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), vtop);
        const __mmask16 ok = _mm512_cmp_ps_mask(d, lo, _CMP_GE_OQ);
        const __m512 e = _mm512_maskz_mov_ps(ok, exp_ps_avx512(_mm512_max_ps(d, lo)));
        s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm512_castps512_ps256(
                                   _mm512_shuffle_f32x4(e, e, _MM_SHUFFLE(3, 2, 3, 2)))));
    }
    alignas(64) double lanes[8];
    _mm512_store_pd(lanes, _mm512_add_pd(s0, s1));
    const double total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    return total + sum_exp_scalar(x + i, n - i, top);
}
#pragma GCC diagnostic pop
#endif  // IVL_X86

// ---------------------------------------------------------------------------------------------
// NEON (aarch64): 4 lanes x 4, lane-by-lane gather (NEON has no gather).

#if defined(__aarch64__)
template <bool kMapped, bool kWeighted>
void term_neon_impl(const TermArgs& a, int64_t i0, int64_t i1) {
    const float32x4_t weight = vdupq_n_f32(a.weight);
    const float32x4_t shift = vdupq_n_f32(a.shift);
    const uint32_t n_logits = static_cast<uint32_t>(a.n_logits);
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
        float32x4_t r[4];
        uint32x4_t ordered = vdupq_n_u32(0xFFFFFFFFu);
        bool map_ok = true;
        for (int u = 0; u < 4; ++u) {
            const int64_t j = i + 4 * u;
            const float32x4_t c = kWeighted ? vmulq_f32(weight, vld1q_f32(a.token_weights + j)) : weight;
            float32x4_t x;
            if (kMapped) {
                float lanes[4];
                uint32_t used[4];
                for (int k = 0; k < 4; ++k) {
                    const int32_t m = a.token_map[j + k];
                    const bool in_range = static_cast<uint32_t>(m) < n_logits;
                    map_ok &= in_range || m == -1;
                    lanes[k] = in_range ? a.logits[m] : 0.0f;
                    used[k] = in_range ? 0xFFFFFFFFu : 0u;
                }
                x = vreinterpretq_f32_u32(vandq_u32(
                    vreinterpretq_u32_f32(vsubq_f32(vld1q_f32(lanes), shift)), vld1q_u32(used)));
            } else {
                x = vsubq_f32(vld1q_f32(a.logits + j), shift);
            }
            r[u] = vfmaq_f32(vld1q_f32(a.acc + j), c, x);
            ordered = vandq_u32(ordered, vceqq_f32(r[u], r[u]));
        }
        if (vminvq_u32(ordered) == 0 || !map_ok) {
            term_scalar_range(a, i, i + 16);
            continue;
        }
        for (int u = 0; u < 4; ++u) vst1q_f32(a.acc + i + 4 * u, r[u]);
    }
    term_scalar_range(a, i, i1);
}

inline float32x4_t exp_ps_neon(float32x4_t x) {
    const float32x4_t fx = vrndnq_f32(vmulq_n_f32(x, kLog2e));
    float32x4_t r = vfmsq_f32(x, fx, vdupq_n_f32(kLn2Hi));
    r = vfmsq_f32(r, fx, vdupq_n_f32(kLn2Lo));
    float32x4_t p = vfmaq_f32(vdupq_n_f32(kP1), vdupq_n_f32(kP0), r);
    p = vfmaq_f32(vdupq_n_f32(kP2), p, r);
    p = vfmaq_f32(vdupq_n_f32(kP3), p, r);
    p = vfmaq_f32(vdupq_n_f32(kP4), p, r);
    p = vfmaq_f32(vdupq_n_f32(kP5), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(fx), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

double sum_exp_neon(const float* x, int64_t n, float top) {
    const float32x4_t vtop = vdupq_n_f32(top), lo = vdupq_n_f32(kExpLo);
    float64x2_t s0 = vdupq_n_f64(0.0), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float32x4_t e[2];
        for (int u = 0; u < 2; ++u) {
            const float32x4_t d = vsubq_f32(vld1q_f32(x + i + 4 * u), vtop);
            const uint32x4_t ok = vcgeq_f32(d, lo);
            e[u] = vreinterpretq_f32_u32(
                vandq_u32(vreinterpretq_u32_f32(exp_ps_neon(vmaxq_f32(d, lo))), ok));
        }
        s0 = vaddq_f64(s0, vcvt_f64_f32(vget_low_f32(e[0])));
        s1 = vaddq_f64(s1, vcvt_high_f64_f32(e[0]));
        s2 = vaddq_f64(s2, vcvt_f64_f32(vget_low_f32(e[1])));
        s3 = vaddq_f64(s3, vcvt_high_f64_f32(e[1]));
    }
    return vaddvq_f64(vaddq_f64(vaddq_f64(s0, s1), vaddq_f64(s2, s3))) +
           sum_exp_scalar(x + i, n - i, top);
}
#endif  // __aarch64__

// ---------------------------------------------------------------------------------------------
// Dispatch: one table per level, chosen by the name of kernels.cpp's active level.

using TermFn = void (*)(const TermArgs&, int64_t, int64_t);

struct TermKernels {
    TermFn term[4];  // [mapped * 2 + weighted]
    double (*sum_exp)(const float* x, int64_t n, float top);  // sum of exp(x[i] - top), x <= top
    double (*sum_exp_band)(const float* x, int64_t n, float lo, float hi, float t, float top);
};

#define IVL_TERM_TABLE(impl) {impl<false, false>, impl<false, true>, impl<true, false>, impl<true, true>}

// sum_exp_band runs once in a while (an undecided top-p cut): AVX-512 reuses AVX2's, NEON
// the scalar one.
const TermKernels kScalarTerms = {IVL_TERM_TABLE(term_scalar_impl), sum_exp_scalar,
                                  sum_exp_band_scalar};
#if defined(IVL_X86)
const TermKernels kAvx2Terms = {IVL_TERM_TABLE(term_avx2_impl), sum_exp_avx2, sum_exp_band_avx2};
const TermKernels kAvx512Terms = {IVL_TERM_TABLE(term_avx512_impl), sum_exp_avx512,
                                  sum_exp_band_avx2};
#endif
#if defined(__aarch64__)
const TermKernels kNeonTerms = {IVL_TERM_TABLE(term_neon_impl), sum_exp_neon, sum_exp_band_scalar};
#endif
#undef IVL_TERM_TABLE

const TermKernels& term_kernels(const detail::Kernels& level) {
    const std::string name = level.name;
#if defined(IVL_X86)
    if (name == "avx512") return kAvx512Terms;
    if (name == "avx2") return kAvx2Terms;
#endif
#if defined(__aarch64__)
    if (name == "neon") return kNeonTerms;
#endif
    return kScalarTerms;
}

// ---------------------------------------------------------------------------------------------
// The fuse: checked once per call, then swept in chunks.

struct PreparedFuse {
    float* out;
    const float* base;
    int64_t n_base;
    const detail::Kernels* kernels;
    const TermKernels* term_kernels;
    TermArgs terms[kMaxFuseTerms];
    int n_terms = 0;   // the terms with weight != 0
    bool masked = false;
    float mask_threshold = -kInf;  // out[i] = -inf where base[i] < this
};

// logsumexp of a kLogSoftmax term's whole vocabulary, in double; throws on NaN anywhere in
// it (every logit is used), on +inf, and when every logit is -inf.
double log_sum_exp(const detail::Kernels& kernels, const TermKernels& terms, const float* z,
                   int64_t n, int term) {
    const std::string name = "term " + std::to_string(term);
    const int64_t bad = kernels.first_nan(z, n);
    if (bad >= 0) {
        throw std::invalid_argument("NaN in " + name + " logits at index " + std::to_string(bad));
    }
    const float top = kernels.max_value(z, n);
    if (top == kInf) {
        throw std::invalid_argument(name + ": logit " + std::to_string(kernels.first_index_ge(z, n, kInf)) +
                                    " is +inf: log_softmax is undefined");
    }
    if (!(top > -kInf)) throw std::invalid_argument(name + ": every logit is -inf: log_softmax is undefined");
    return static_cast<double>(top) + std::log(terms.sum_exp(z, n, top));
}

PreparedFuse prepare(float* out, const float* base, int64_t n_base, const FuseTerm* terms,
                     int n_terms, float mask_alpha) {
    if (n_base < 0) throw std::invalid_argument("negative vocabulary size");
    if (n_terms < 0 || n_terms > kMaxFuseTerms) {
        throw std::invalid_argument("at most " + std::to_string(kMaxFuseTerms) + " terms, got " +
                                    std::to_string(n_terms));
    }
    if (!(mask_alpha >= 0.0f && mask_alpha <= 1.0f)) {
        throw std::invalid_argument("mask_alpha must be in [0, 1] (0 disables the mask), got " +
                                    std::to_string(mask_alpha));
    }
    if (out == base && n_base > 0) throw std::invalid_argument("out must not alias base_logits");
    PreparedFuse p;
    p.out = out;
    p.base = base;
    p.n_base = n_base;
    p.kernels = &detail::active_kernels();
    p.term_kernels = &term_kernels(*p.kernels);
    for (int t = 0; t < n_terms; ++t) {
        const FuseTerm& term = terms[t];
        const std::string name = "term " + std::to_string(t);
        if (term.n_logits < 0) throw std::invalid_argument(name + ": negative vocabulary size");
        if (!std::isfinite(term.weight)) throw std::invalid_argument(name + ": weight must be finite");
        if (term.transform != TermTransform::kRaw && term.transform != TermTransform::kLogSoftmax) {
            throw std::invalid_argument(name + ": unknown transform");
        }
        if (!term.token_map && term.n_logits != n_base) {
            throw std::invalid_argument(name + ": without a token_map its vocabulary (" +
                                        std::to_string(term.n_logits) +
                                        ") must equal the base vocabulary (" +
                                        std::to_string(n_base) + ")");
        }
        if (term.weight == 0.0f) continue;  // not read at all
        double shift = 0.0;
        if (term.transform == TermTransform::kLogSoftmax && term.n_logits > 0) {
            shift = log_sum_exp(*p.kernels, *p.term_kernels, term.logits, term.n_logits, t);
        }
        p.terms[p.n_terms++] = TermArgs{out, base, term.logits, term.token_map,
                                        term.token_weights, term.weight,
                                        static_cast<float>(shift), term.n_logits, t};
    }
    if (mask_alpha > 0.0f && n_base > 0) {
        // Keep base[i] >= max + log(a), exactly: the smallest float at or above the bound.
        // base may hold NaN here: the sweep raises on it before any result is used.
        const double bound = static_cast<double>(p.kernels->max_value(base, n_base)) +
                             std::log(static_cast<double>(mask_alpha));
        float t = static_cast<float>(bound);
        if (static_cast<double>(t) < bound) t = std::nextafter(t, kInf);
        p.masked = true;
        p.mask_threshold = t;
    }
    return p;
}

// base_checked: the whole base is known NaN-free (fused_bounds read it), so skip the check.
void fuse_chunk(const PreparedFuse& p, int64_t i0, int64_t i1, bool base_checked = false) {
    const int64_t bad = base_checked ? -1 : p.kernels->first_nan(p.base + i0, i1 - i0);
    if (bad >= 0) {
        throw std::invalid_argument("NaN in base logits at index " + std::to_string(i0 + bad));
    }
    std::memcpy(p.out + i0, p.base + i0, sizeof(float) * static_cast<size_t>(i1 - i0));
    for (int t = 0; t < p.n_terms; ++t) {
        const TermArgs& a = p.terms[t];
        if (a.n_logits == 0) {  // only -1 entries are valid; the gathers may read z[0]
            term_scalar_range(a, i0, i1);
            continue;
        }
        p.term_kernels->term[(a.token_map ? 2 : 0) + (a.token_weights ? 1 : 0)](a, i0, i1);
    }
    if (p.masked) {
        const float t = p.mask_threshold;
        float* out = p.out;
        const float* base = p.base;
        for (int64_t i = i0; i < i1; ++i) out[i] = base[i] < t ? -kInf : out[i];
    }
}

// The float nearest `v` on the side away from the bound it must hold (up: >= v; down: <= v).
float float_up(double v) {
    float f = static_cast<float>(v);
    if (static_cast<double>(f) < v) f = std::nextafter(f, kInf);
    return f;
}
float float_down(double v) {
    float f = static_cast<float>(v);
    if (static_cast<double>(f) > v) f = std::nextafter(f, -kInf);
    return f;
}

// Bounds on each kScanBlock block of the fused logits, for Sampler::sample_bounded. A term
// adds c * x, c = weight (no token weights) or c in [0, weight] (token weights in [0, 1]; a
// map -1 adds 0 too), x = z - shift within the range of z: over the whole vocabulary for a
// mapped term, over the block's own logits for an identity one (so a same-vocabulary value
// net bounds each block by its own best). Every fused logit of a block is then at most its
// base max + the largest additions, and the token holding that max at least it + the
// smallest; both widened by the sweep's float rounding (at most n_terms + 1 roundings of
// values no larger than |base max| + the additions' magnitudes) 16 times over, which leaves
// room for the roundings of this computation. One read of base and of each term's logits.
// False (no bounds: the plain sweep) with the mask on, a NaN anywhere in base or a term (the
// sweep decides whether it raises), or an infinite term logit.
struct BoundScratch {
    std::vector<float> add_hi, add_lo;
};

bool fused_bounds(const PreparedFuse& p, float* hi, float* lo) {
    if (p.masked || p.n_base == 0) return false;
    const int64_t n_blocks = (p.n_base + detail::kScanBlock - 1) / detail::kScanBlock;
    thread_local BoundScratch scratch;
    double up = 0.0, down = 0.0, magnitude = 0.0;
    bool per_block = false;
    for (int t = 0; t < p.n_terms; ++t) {
        const TermArgs& a = p.terms[t];
        if (a.n_logits == 0) continue;  // only -1 entries: adds nothing
        if (a.token_map) {
            const double w = a.weight;
            float z_lo, z_hi;
            if (!p.kernels->min_max(a.logits, a.n_logits, &z_lo, &z_hi)) return false;
            const double x_lo = static_cast<double>(z_lo) - a.shift;
            const double x_hi = static_cast<double>(z_hi) - a.shift;
            if (!std::isfinite(x_lo) || !std::isfinite(x_hi)) return false;
            up += std::max({w * x_lo, w * x_hi, 0.0});
            down += std::min({w * x_lo, w * x_hi, 0.0});
            magnitude += std::max(std::fabs(w * x_lo), std::fabs(w * x_hi));
            continue;
        }
        if (!per_block) {
            scratch.add_hi.assign(static_cast<size_t>(n_blocks), 0.0f);
            scratch.add_lo.assign(static_cast<size_t>(n_blocks), 0.0f);
            per_block = true;
        }
        float largest = 0.0f;
        if (!p.kernels->block_term_range(a.logits, a.n_logits, a.weight, a.shift,
                                         a.token_weights != nullptr, scratch.add_hi.data(),
                                         scratch.add_lo.data(), &largest)) {
            return false;
        }
        magnitude += largest;
    }
    if (!p.kernels->block_max(p.base, p.n_base, hi)) return false;  // block maxes into hi
    p.kernels->block_bounds(hi, lo, per_block ? scratch.add_hi.data() : nullptr,
                            per_block ? scratch.add_lo.data() : nullptr, n_blocks, float_up(up),
                            float_down(down), static_cast<float>((p.n_terms + 1) * 0x1p-20),
                            float_up(magnitude * (1.0 + 0x1p-20)));
    return true;
}

}  // namespace

namespace detail {
double sum_exp_band(const float* x, int64_t n, float lo, float hi, float t, float top_scaled) {
    return term_kernels(active_kernels()).sum_exp_band(x, n, lo, hi, t, top_scaled);
}
}  // namespace detail

void fuse_terms(float* out, const float* base_logits, int64_t n_base, const FuseTerm* terms,
                int n_terms, float mask_alpha) {
    const PreparedFuse p = prepare(out, base_logits, n_base, terms, n_terms, mask_alpha);
    constexpr int64_t kChunk = 4096;  // 16 KiB: the accumulator stays in L1 across the terms
    for (int64_t i0 = 0; i0 < n_base; i0 += kChunk) fuse_chunk(p, i0, std::min(n_base, i0 + kChunk));
}

int32_t fuse_terms_and_sample(Sampler& sampler, float* scratch, const float* base_logits,
                              int64_t n_base, const FuseTerm* terms, int n_terms,
                              float mask_alpha) {
    const PreparedFuse p = prepare(scratch, base_logits, n_base, terms, n_terms, mask_alpha);
    bool bounded = false;  // fused_bounds succeeded: base has no NaN
    return sampler.sample_bounded(
        scratch, n_base,
        [&p, &bounded](float* hi, float* lo) { return bounded = fused_bounds(p, hi, lo); },
        [&p, &bounded](int64_t i0, int64_t i1) {
            constexpr int64_t kChunk = 4096;
            for (int64_t c0 = i0; c0 < i1; c0 += kChunk) {
                fuse_chunk(p, c0, std::min(i1, c0 + kChunk), bounded);
            }
        });
}

}  // namespace ivl
