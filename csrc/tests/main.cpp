// main.cpp - the core test driver: csrc/core checked at every SIMD level, no Python.
//
//   scripts/test_core.sh native    # build and run here (x86-64: scalar/avx2/avx512)
//   scripts/test_core.sh aarch64   # cross-build, run under qemu-aarch64 (neon)
//
// Exit status 0 only when every check passed; the last line is "N passed, N failed".
#include <cstdio>
#include <string>

#include "check.h"
#include "core/fuse.h"

int main() {
    using namespace ivl::test;
    std::string levels;
    for (const auto& level : ivl::available_simd_levels()) levels += " " + level;
    std::printf("ivl core test driver: levels available:%s; auto = %s\n", levels.c_str(),
                ivl::simd_level().c_str());

    begin_suite("dispatch");
#if defined(__aarch64__)
    // The point of the aarch64 build: the NEON kernels are what "auto" runs.
    check(ivl::simd_level() == "neon", "aarch64 build selects neon by default",
          "active level is " + ivl::simd_level());
#endif
    const auto all = ivl::available_simd_levels();
    check(!all.empty() && all.front() == "scalar", "scalar is the first level");
    for (const auto& level : all) {
        check(level == "scalar" || level == "neon" || level == "avx2" || level == "avx512",
              "known level name " + level);
    }
    check_throws("unknown level is rejected", "SIMD level 'sse9' is not available",
                 [] { ivl::set_simd_level("sse9"); });
    ivl::set_simd_level("scalar");
    check(ivl::simd_level() == "scalar", "set_simd_level(scalar)");
    ivl::set_simd_level("auto");
    check(ivl::simd_level() == all.back(), "auto is the best level");

    for (const auto& [name, suite] : {std::pair{"fuse", &test_fuse},
                                      std::pair{"fuse_terms", &test_fuse_terms},
                                      std::pair{"kernels", &test_kernels},
                                      std::pair{"sampler", &test_sampler},
                                      std::pair{"token_map", &test_token_map}}) {
        begin_suite(name);
        const std::string error = error_of(suite);
        check(error.empty(), std::string(name) + " suite ran to the end",
              "uncaught exception: " + error);
        std::printf("%s done\n", name);
        std::fflush(stdout);
    }

    std::printf("levels checked:%s\n", levels.c_str());
    print_summary();
    return failed_count() == 0 ? 0 : 1;
}
