// check.h - the core test driver's harness: named checks, deterministic inputs, references.
//
// A check is one named comparison ("fuse identity n=4099 [avx2] vs scalar"); arrays are
// compared element by element inside it and a failure prints the first mismatch. Suites run
// their SIMD-dependent cases at every level the CPU offers (for_each_level) and compare each
// vector level with the scalar level's output on the same inputs, as tests/test_kernels.py
// and tests/test_sampler.py do through the Python binding.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace ivl::test {

// --- tally ----------------------------------------------------------------------------------

// Records one check under the current suite; prints a FAIL line (with `detail`) when !ok.
bool check(bool ok, const std::string& name, const std::string& detail = "");
void begin_suite(const std::string& suite);
void print_summary();      // per-suite counts, then "N passed, N failed"
int failed_count();

// Message of the std::exception `body` throws, "" when it returns, "<other>" otherwise.
std::string error_of(const std::function<void()>& body);
// Checks that `body` throws a message starting with `prefix`.
void check_throws(const std::string& name, const std::string& prefix,
                  const std::function<void()>& body);

// --- SIMD levels ----------------------------------------------------------------------------

// Runs body(level) with each available level active ("scalar" first), then restores "auto".
void for_each_level(const std::function<void(const std::string&)>& body);

// --- inputs (own generator: the same numbers on every platform and standard library) ---------

class Rng {
public:
    explicit Rng(uint64_t seed) : state_(seed * 0x9E3779B97F4A7C15ull + 1) {}
    uint64_t next();
    double uniform();                       // [0, 1)
    double normal();                        // N(0, 1)
    int64_t integer(int64_t lo, int64_t hi);  // [lo, hi)

private:
    uint64_t state_;
};

std::vector<float> random_logits(Rng& rng, int64_t n, double scale = 3.0);

// --- comparisons ----------------------------------------------------------------------------

// numpy's assert_allclose on float32 arrays: |got - want| <= atol + rtol * |want|; equal
// infinities match. On mismatch `detail` names the first bad index.
bool all_close(const std::vector<float>& got, const std::vector<float>& want, double rtol,
               double atol, std::string& detail);
// Bit-for-bit equality except +0 == -0 (numpy's assert_array_equal on finite/inf data).
bool all_equal(const std::vector<float>& got, const std::vector<float>& want,
               std::string& detail);

void check_close(const std::string& name, const std::vector<float>& got,
                 const std::vector<float>& want, double rtol, double atol);
void check_equal(const std::string& name, const std::vector<float>& got,
                 const std::vector<float>& want);

// --- suites ---------------------------------------------------------------------------------

void test_fuse();
void test_fuse_terms();
void test_kernels();
void test_sampler();
void test_token_map();

}  // namespace ivl::test
