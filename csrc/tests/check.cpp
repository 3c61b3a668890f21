// check.cpp - the harness behind check.h.
#include "check.h"

#include <cmath>
#include <cstdio>
#include <exception>
#include <map>
#include <sstream>

#include "core/fuse.h"

namespace ivl::test {

namespace {

struct SuiteCount {
    int passed = 0;
    int failed = 0;
};

std::vector<std::pair<std::string, SuiteCount>>& suites() {
    static std::vector<std::pair<std::string, SuiteCount>> all;
    return all;
}

std::string& current_level() {
    static std::string level;
    return level;
}

std::string describe(float x) {
    std::ostringstream s;
    s.precision(9);
    s << x;
    return s.str();
}

}  // namespace

void begin_suite(const std::string& suite) { suites().push_back({suite, {}}); }

bool check(bool ok, const std::string& name, const std::string& detail) {
    if (suites().empty()) begin_suite("(none)");
    SuiteCount& count = suites().back().second;
    (ok ? count.passed : count.failed) += 1;
    if (!ok) {
        std::string where = current_level().empty() ? "" : " [" + current_level() + "]";
        std::printf("FAIL %s: %s%s%s%s\n", suites().back().first.c_str(), name.c_str(),
                    where.c_str(), detail.empty() ? "" : ": ", detail.c_str());
        std::fflush(stdout);
    }
    return ok;
}

int failed_count() {
    int failed = 0;
    for (const auto& [name, count] : suites()) failed += count.failed;
    return failed;
}

void print_summary() {
    int passed = 0, failed = 0;
    for (const auto& [name, count] : suites()) {
        std::printf("  %-10s %6d passed, %d failed\n", name.c_str(), count.passed, count.failed);
        passed += count.passed;
        failed += count.failed;
    }
    std::printf("%d passed, %d failed\n", passed, failed);
}

std::string error_of(const std::function<void()>& body) {
    try {
        body();
    } catch (const std::exception& e) {
        return e.what();
    } catch (...) {
        return "<other>";
    }
    return "";
}

void check_throws(const std::string& name, const std::string& prefix,
                  const std::function<void()>& body) {
    const std::string message = error_of(body);
    const bool ok = !message.empty() && message.compare(0, prefix.size(), prefix) == 0;
    check(ok, name, "expected an error starting '" + prefix + "', got " +
                        (message.empty() ? std::string("no error") : "'" + message + "'"));
}

void for_each_level(const std::function<void(const std::string&)>& body) {
    struct Restore {  // also when a case throws out of `body`
        ~Restore() {
            current_level().clear();
            set_simd_level("auto");
        }
    } restore;
    for (const std::string& level : available_simd_levels()) {
        set_simd_level(level);
        current_level() = level;
        if (check(simd_level() == level, "set_simd_level(" + level + ") is active")) body(level);
    }
}

uint64_t Rng::next() {  // splitmix64
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

double Rng::normal() {  // Box-Muller; one of the pair is enough here
    const double u1 = 1.0 - uniform();  // (0, 1]
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

int64_t Rng::integer(int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi - lo));
}

std::vector<float> random_logits(Rng& rng, int64_t n, double scale) {
    std::vector<float> x(static_cast<size_t>(n));
    for (auto& v : x) v = static_cast<float>(rng.normal() * scale);
    return x;
}

bool all_close(const std::vector<float>& got, const std::vector<float>& want, double rtol,
               double atol, std::string& detail) {
    if (got.size() != want.size()) {
        detail = "sizes " + std::to_string(got.size()) + " vs " + std::to_string(want.size());
        return false;
    }
    for (size_t i = 0; i < got.size(); ++i) {
        const double g = got[i], w = want[i];
        const bool ok = (g == w) || (std::isnan(g) && std::isnan(w)) ||
                        (std::isfinite(g) && std::isfinite(w) &&
                         std::fabs(g - w) <= atol + rtol * std::fabs(w));
        if (!ok) {
            detail = "index " + std::to_string(i) + ": " + describe(got[i]) + " vs " +
                     describe(want[i]);
            return false;
        }
    }
    return true;
}

bool all_equal(const std::vector<float>& got, const std::vector<float>& want,
               std::string& detail) {
    return all_close(got, want, 0.0, 0.0, detail);
}

void check_close(const std::string& name, const std::vector<float>& got,
                 const std::vector<float>& want, double rtol, double atol) {
    std::string detail;
    const bool ok = all_close(got, want, rtol, atol, detail);
    check(ok, name, detail);
}

void check_equal(const std::string& name, const std::vector<float>& got,
                 const std::vector<float>& want) {
    std::string detail;
    const bool ok = all_equal(got, want, detail);
    check(ok, name, detail);
}

}  // namespace ivl::test
