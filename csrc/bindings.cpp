// bindings.cpp - ivl_local._core: the only file that sees pybind11.
//
// Every array argument must already be a 1-D, C-contiguous numpy array of exactly float32 or
// int32 in native byte order: nothing is converted silently (a silent copy per decode step
// would hide a bug and cost a full pass). After the checks the GIL is released and the
// core is trusted; its std::invalid_argument errors surface as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "core/fuse.h"
#include "core/fuse_terms.h"
#include "core/sampler.h"
#include "core/token_map.h"

namespace py = pybind11;

namespace {

constexpr int64_t kAnyLength = -1;
constexpr int64_t kMaxVocab = std::numeric_limits<int32_t>::max();

// Checks `obj` is a numpy array of exactly `T` (float32 or int32), 1-D, C-contiguous, with
// `length` elements (unless kAnyLength), writable if asked. Returns the array.
template <class T>
py::array checked_array(const py::object& obj, const char* name, int64_t length,
                        bool writable = false) {
    constexpr bool is_float = std::is_same_v<T, float>;
    const char* dtype_name = is_float ? "float32" : "int32";
    if (!py::isinstance<py::array>(obj)) {
        throw py::type_error(std::string(name) + " must be a numpy " + dtype_name +
                             " array, got " + std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    }
    auto arr = py::reinterpret_borrow<py::array>(obj);
    const py::dtype dt = arr.dtype();
    const char byteorder = dt.byteorder();
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    constexpr char kNativeOrder = '>';
#else
    constexpr char kNativeOrder = '<';
#endif
    const bool native = byteorder == '=' || byteorder == '|' || byteorder == kNativeOrder;
    if (dt.kind() != (is_float ? 'f' : 'i') || dt.itemsize() != 4 || !native) {
        throw py::type_error(std::string(name) + " must have dtype " + dtype_name + ", got " +
                             std::string(py::str(dt)));
    }
    if (arr.ndim() != 1) {
        throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) +
                              "-D");
    }
    if (!(arr.flags() & py::array::c_style)) {
        throw py::value_error(std::string(name) + " must be C-contiguous (use np.ascontiguousarray)");
    }
    if (length != kAnyLength && arr.shape(0) != length) {
        throw py::value_error(std::string(name) + " must have length " + std::to_string(length) +
                              ", got " + std::to_string(arr.shape(0)));
    }
    if (arr.shape(0) > kMaxVocab) {
        throw py::value_error(std::string(name) + " is longer than 2^31 - 1");
    }
    if (writable && !arr.writeable()) {
        throw py::value_error(std::string(name) + " must be writable");
    }
    return arr;
}

template <class T>
const T* data_of(const py::array& arr) {
    return static_cast<const T*>(arr.data());
}

// Optional int32 token_map / float32 token_weights of length n_base: (array or None) -> ptr.
struct MapArgs {
    py::object keep_map, keep_weights;
    const int32_t* token_map = nullptr;
    const float* token_weights = nullptr;
};

MapArgs checked_map(const py::object& token_map, const py::object& token_weights, int64_t n_base) {
    MapArgs out;
    if (!token_map.is_none()) {
        auto arr = checked_array<int32_t>(token_map, "token_map", n_base);
        out.token_map = data_of<int32_t>(arr);
        out.keep_map = arr;
    }
    if (!token_weights.is_none()) {
        auto arr = checked_array<float>(token_weights, "token_weights", n_base);
        out.token_weights = data_of<float>(arr);
        out.keep_weights = arr;
    }
    return out;
}

void check_identity(const MapArgs& map, int64_t n_base, int64_t n_value) {
    if (!map.token_map && n_base != n_value) {
        throw py::value_error("without a token_map, value_logits must have the base length (" +
                              std::to_string(n_base) + "), got " + std::to_string(n_value));
    }
}

void check_length(int64_t n, const char* name) {
    if (n < 0 || n > kMaxVocab) {
        throw py::value_error(std::string(name) + " must be in [0, 2^31 - 1], got " +
                              std::to_string(n));
    }
}

// Weights are data: checked where they enter (here, and the map loader in Python), not on
// the per-token path.
void check_weights(const MapArgs& map, int64_t n_base) {
    if (!map.token_weights) return;
    for (int64_t i = 0; i < n_base; ++i) {
        const float w = map.token_weights[i];
        if (!(w >= 0.0f && w <= 1.0f)) {  // NaN fails both
            throw py::value_error("token_weights[" + std::to_string(i) + "] is " +
                                  std::to_string(w) + ", must be in [0, 1]");
        }
    }
}

template <class T>
T* pointer(uintptr_t address, const char* name) {
    if (address == 0) throw py::value_error(std::string(name) + " is a null pointer");
    return reinterpret_cast<T*>(address);
}

py::array_t<float> fuse_logits_py(const py::object& base_logits, const py::object& value_logits,
                                  const py::object& token_map, float alpha,
                                  const py::object& token_weights) {
    auto base = checked_array<float>(base_logits, "base_logits", kAnyLength);
    auto value = checked_array<float>(value_logits, "value_logits", kAnyLength);
    const int64_t n_base = base.shape(0), n_value = value.shape(0);
    const MapArgs map = checked_map(token_map, token_weights, n_base);
    check_identity(map, n_base, n_value);
    check_weights(map, n_base);
    py::array_t<float> out(n_base);
    float* out_ptr = out.mutable_data();
    {
        py::gil_scoped_release release;
        ivl::fuse_logits(out_ptr, data_of<float>(base), n_base, data_of<float>(value), n_value,
                         map.token_map, alpha, map.token_weights);
    }
    return out;
}

void fuse_logits_ptr_py(uintptr_t out_ptr, uintptr_t base_ptr, int64_t n_base, uintptr_t value_ptr,
                        int64_t n_value, const py::object& token_map, float alpha,
                        const py::object& token_weights) {
    check_length(n_base, "n_base");
    check_length(n_value, "n_value");
    const MapArgs map = checked_map(token_map, token_weights, n_base);
    check_identity(map, n_base, n_value);
    check_weights(map, n_base);
    float* out = pointer<float>(out_ptr, "out_ptr");
    const float* base = pointer<const float>(base_ptr, "base_ptr");
    const float* value = pointer<const float>(value_ptr, "value_ptr");
    py::gil_scoped_release release;
    ivl::fuse_logits(out, base, n_base, value, n_value, map.token_map, alpha, map.token_weights);
}

int32_t fuse_and_sample_py(ivl::Sampler& sampler, uintptr_t base_ptr, int64_t n_base,
                           uintptr_t value_ptr, int64_t n_value, const py::object& token_map,
                           float alpha, const py::object& token_weights, const py::object& scratch) {
    check_length(n_base, "n_base");
    check_length(n_value, "n_value");
    const MapArgs map = checked_map(token_map, token_weights, n_base);
    check_identity(map, n_base, n_value);
    auto work = checked_array<float>(scratch, "scratch", n_base, /*writable=*/true);
    float* work_ptr = static_cast<float*>(work.mutable_data());
    const float* base = pointer<const float>(base_ptr, "base_ptr");
    const float* value = pointer<const float>(value_ptr, "value_ptr");
    py::gil_scoped_release release;
    return ivl::fuse_and_sample(sampler, work_ptr, base, n_base, value, n_value, map.token_map,
                                alpha, map.token_weights);
}

// --- fuse_terms: a list of term tuples -> ivl::FuseTerm[] ------------------------------------

ivl::TermTransform parse_transform(const py::handle& obj, const std::string& where) {
    if (py::isinstance<py::str>(obj)) {
        const std::string name = obj.cast<std::string>();
        if (name == "raw") return ivl::TermTransform::kRaw;
        if (name == "log_softmax") return ivl::TermTransform::kLogSoftmax;
    }
    throw py::value_error(where + ": transform must be 'raw' or 'log_softmax', got " +
                          std::string(py::repr(obj)));
}

float parse_weight(const py::handle& obj, const std::string& where) {
    if (!py::isinstance<py::float_>(obj) && !py::isinstance<py::int_>(obj)) {
        throw py::type_error(where + ": weight must be a number, got " +
                             std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    }
    const double weight = obj.cast<double>();
    const float as_float = static_cast<float>(weight);
    if (!std::isfinite(as_float)) {
        throw py::value_error(where + ": weight must be a finite float32, got " +
                              std::string(py::repr(obj)));
    }
    return as_float;
}

// The terms and the arrays that keep their pointers alive.
struct TermList {
    std::vector<ivl::FuseTerm> terms;
    std::vector<py::object> keep;
};

// `terms`: a list of tuples. Public form (with_pointer false):
// (logits f32[n], token_map i32[n_base] | None, token_weights f32[n_base] | None, weight,
// transform); private form: (logits_ptr, n, token_map, token_weights, weight, transform).
TermList checked_terms(const py::object& terms, int64_t n_base, bool with_pointer) {
    if (!py::isinstance<py::list>(terms)) {  // a tuple would be one term passed bare
        throw py::type_error("terms must be a list of tuples, got " +
                             std::string(py::str(py::type::handle_of(terms).attr("__name__"))));
    }
    const auto items = py::reinterpret_borrow<py::sequence>(terms);
    if (items.size() > static_cast<size_t>(ivl::kMaxFuseTerms)) {
        throw py::value_error("at most " + std::to_string(ivl::kMaxFuseTerms) + " terms, got " +
                              std::to_string(items.size()));
    }
    const size_t arity = with_pointer ? 6 : 5;
    const char* shape = with_pointer
        ? "(logits_ptr, n, token_map, token_weights, weight, transform)"
        : "(logits, token_map, token_weights, weight, transform)";
    TermList out;
    for (size_t t = 0; t < items.size(); ++t) {
        const std::string where = "terms[" + std::to_string(t) + "]";
        const py::handle item = items[t];
        if (!py::isinstance<py::tuple>(item) || py::len(item) != arity) {
            throw py::type_error(where + " must be a tuple " + shape);
        }
        const auto tuple = py::reinterpret_borrow<py::tuple>(item);
        ivl::FuseTerm term{};
        size_t k = 0;
        if (with_pointer) {
            term.logits = pointer<const float>(tuple[k++].cast<uintptr_t>(), (where + ".logits_ptr").c_str());
            term.n_logits = tuple[k++].cast<int64_t>();
            check_length(term.n_logits, (where + ".n").c_str());
        } else {
            auto logits = checked_array<float>(tuple[k++], (where + ".logits").c_str(), kAnyLength);
            term.logits = data_of<float>(logits);
            term.n_logits = logits.shape(0);
            out.keep.push_back(logits);
        }
        const MapArgs map = checked_map(tuple[k], tuple[k + 1], n_base);
        k += 2;
        if (!map.token_map && term.n_logits != n_base) {
            throw py::value_error(where + ": without a token_map, its logits must have the base "
                                  "length (" + std::to_string(n_base) + "), got " +
                                  std::to_string(term.n_logits));
        }
        if (!with_pointer) check_weights(map, n_base);
        term.token_map = map.token_map;
        term.token_weights = map.token_weights;
        out.keep.push_back(map.keep_map);
        out.keep.push_back(map.keep_weights);
        term.weight = parse_weight(tuple[k++], where);
        term.transform = parse_transform(tuple[k++], where);
        out.terms.push_back(term);
    }
    return out;
}

float checked_mask_alpha(double mask_alpha) {
    if (!(mask_alpha >= 0.0 && mask_alpha <= 1.0)) {
        throw py::value_error("mask_alpha must be in [0, 1] (0 disables the mask), got " +
                              std::to_string(mask_alpha));
    }
    return static_cast<float>(mask_alpha);
}

py::array_t<float> fuse_terms_py(const py::object& base_logits, const py::object& terms,
                                 double mask_alpha) {
    auto base = checked_array<float>(base_logits, "base_logits", kAnyLength);
    const int64_t n_base = base.shape(0);
    const TermList list = checked_terms(terms, n_base, /*with_pointer=*/false);
    const float alpha = checked_mask_alpha(mask_alpha);
    py::array_t<float> out(n_base);
    float* out_ptr = out.mutable_data();
    {
        py::gil_scoped_release release;
        ivl::fuse_terms(out_ptr, data_of<float>(base), n_base, list.terms.data(),
                        static_cast<int>(list.terms.size()), alpha);
    }
    return out;
}

int32_t fuse_terms_and_sample_py(ivl::Sampler& sampler, uintptr_t base_ptr, int64_t n_base,
                                 const py::object& terms, double mask_alpha,
                                 const py::object& scratch) {
    check_length(n_base, "n_base");
    const TermList list = checked_terms(terms, n_base, /*with_pointer=*/true);
    const float alpha = checked_mask_alpha(mask_alpha);
    auto work = checked_array<float>(scratch, "scratch", n_base, /*writable=*/true);
    float* work_ptr = static_cast<float*>(work.mutable_data());
    const float* base = pointer<const float>(base_ptr, "base_ptr");
    py::gil_scoped_release release;
    return ivl::fuse_terms_and_sample(sampler, work_ptr, base, n_base, list.terms.data(),
                                      static_cast<int>(list.terms.size()), alpha);
}

std::vector<std::string> token_list(const py::list& tokens, const char* name) {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    for (const auto& item : tokens) {
        if (!py::isinstance<py::bytes>(item)) {
            throw py::type_error(std::string(name) + " must be a list of bytes, found " +
                                 std::string(py::str(py::type::handle_of(item).attr("__name__"))));
        }
        out.push_back(item.cast<std::string>());
    }
    return out;
}

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& values) {
    py::array_t<T> out(static_cast<py::ssize_t>(values.size()));
    std::copy(values.begin(), values.end(), out.mutable_data());
    return out;
}

py::tuple build_token_map_py(const py::list& base_tokens, const py::object& base_types,
                             const std::string& base_kind, const py::list& value_tokens,
                             const py::object& value_types, const std::string& value_kind) {
    const ivl::VocabKind bk = ivl::parse_vocab_kind(base_kind);
    const ivl::VocabKind vk = ivl::parse_vocab_kind(value_kind);
    const auto base = token_list(base_tokens, "base_tokens");
    const auto value = token_list(value_tokens, "value_tokens");
    auto bt = checked_array<int32_t>(base_types, "base_types", static_cast<int64_t>(base.size()));
    auto vt = checked_array<int32_t>(value_types, "value_types", static_cast<int64_t>(value.size()));
    ivl::TokenMap map;
    {
        py::gil_scoped_release release;
        map = ivl::build_token_map(base, data_of<int32_t>(bt), bk, value, data_of<int32_t>(vt), vk);
    }
    return py::make_tuple(to_numpy(map.token_map), to_numpy(map.token_weights),
                          to_numpy(map.unmatched));
}

py::tuple probs_py(ivl::Sampler& sampler, const py::object& logits) {
    auto arr = checked_array<float>(logits, "logits", kAnyLength);
    std::vector<std::pair<int32_t, float>> result;
    {
        py::gil_scoped_release release;
        result = sampler.probs(data_of<float>(arr), arr.shape(0));
    }
    py::array_t<int32_t> ids(static_cast<py::ssize_t>(result.size()));
    py::array_t<float> probs(static_cast<py::ssize_t>(result.size()));
    for (size_t i = 0; i < result.size(); ++i) {
        ids.mutable_data()[i] = result[i].first;
        probs.mutable_data()[i] = result[i].second;
    }
    return py::make_tuple(ids, probs);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "ivl-local C++ kernels: fused IVL logits, sampler chain, token-map builder";

    ivl::set_simd_level("auto");  // chosen once, at import
    m.def("simd_level", &ivl::simd_level, "Active SIMD level: avx512 | avx2 | neon | scalar.");
    m.def("available_simd_levels", &ivl::available_simd_levels,
          "SIMD levels this CPU supports, scalar first, best last.");
    m.def("set_simd_level", &ivl::set_simd_level, py::arg("level"),
          "Force a SIMD level ('auto' = best); for tests and benchmarks.");

    m.def("fuse_logits", &fuse_logits_py, py::arg("base_logits"), py::arg("value_logits"),
          py::arg("token_map") = py::none(), py::arg("alpha") = 1.0f,
          py::arg("token_weights") = py::none(),
          "out[i] = base[i] + alpha * w[i] * value[map[i]] as a new float32 array.");
    m.def("_fuse_logits_ptr", &fuse_logits_ptr_py, py::arg("out_ptr"), py::arg("base_ptr"),
          py::arg("n_base"), py::arg("value_ptr"), py::arg("n_value"),
          py::arg("token_map") = py::none(), py::arg("alpha") = 1.0f,
          py::arg("token_weights") = py::none(),
          "fuse_logits on raw float* addresses; out_ptr may equal base_ptr.");

    py::class_<ivl::Sampler>(m, "Sampler")
        .def(py::init([](float temperature, int32_t top_k, float top_p, float min_p,
                         float repeat_penalty, int32_t repeat_last_n, float presence_penalty,
                         float frequency_penalty, uint64_t seed) {
                 ivl::SamplerParams p;
                 p.temperature = temperature;
                 p.top_k = top_k;
                 p.top_p = top_p;
                 p.min_p = min_p;
                 p.repeat_penalty = repeat_penalty;
                 p.repeat_last_n = repeat_last_n;
                 p.presence_penalty = presence_penalty;
                 p.frequency_penalty = frequency_penalty;
                 p.seed = seed;
                 return new ivl::Sampler(p);
             }),
             py::arg("temperature") = 0.8f, py::arg("top_k") = 40, py::arg("top_p") = 0.95f,
             py::arg("min_p") = 0.05f, py::arg("repeat_penalty") = 1.0f,
             py::arg("repeat_last_n") = 64, py::arg("presence_penalty") = 0.0f,
             py::arg("frequency_penalty") = 0.0f, py::arg("seed") = 0)
        .def_property_readonly("greedy", &ivl::Sampler::greedy)
        .def(
            "sample",
            [](ivl::Sampler& s, const py::object& logits) {
                auto arr = checked_array<float>(logits, "logits", kAnyLength);
                py::gil_scoped_release release;
                return s.sample(data_of<float>(arr), arr.shape(0));
            },
            py::arg("logits"), "Apply the chain and draw a token (does not accept it).")
        .def(
            "_sample_ptr",
            [](ivl::Sampler& s, uintptr_t logits_ptr, int64_t n) {
                check_length(n, "n");
                const float* logits = pointer<const float>(logits_ptr, "logits_ptr");
                py::gil_scoped_release release;
                return s.sample(logits, n);
            },
            py::arg("logits_ptr"), py::arg("n"), "sample() on a raw float* (not modified).")
        .def(
            "accept",
            [](ivl::Sampler& s, int32_t token) {
                py::gil_scoped_release release;
                s.accept(token);
            },
            py::arg("token"), "Record a token for the penalties.")
        .def(
            "reset",
            [](ivl::Sampler& s) {
                py::gil_scoped_release release;
                s.reset();
            },
            "Clear the penalty history and reseed.")
        .def("probs", &probs_py, py::arg("logits"),
             "(ids int32[k], probs float32[k]) after the chain, best first.");

    m.def("_fuse_and_sample", &fuse_and_sample_py, py::arg("sampler"), py::arg("base_ptr"),
          py::arg("n_base"), py::arg("value_ptr"), py::arg("n_value"), py::arg("token_map"),
          py::arg("alpha"), py::arg("token_weights"), py::arg("scratch"),
          "One decode step: fuse into scratch, sample; GIL released throughout.");

    m.def("fuse_terms", &fuse_terms_py, py::arg("base_logits"), py::arg("terms"),
          py::arg("mask_alpha") = 0.0,
          "base[i] + sum_j weight_j * w_j[i] * T_j(logits_j)[map_j[i]], then the optional "
          "plausibility mask; terms: [(logits, token_map | None, token_weights | None, weight, "
          "'raw' | 'log_softmax')].");
    m.def("_fuse_terms_and_sample", &fuse_terms_and_sample_py, py::arg("sampler"),
          py::arg("base_ptr"), py::arg("n_base"), py::arg("terms"), py::arg("mask_alpha"),
          py::arg("scratch"),
          "One decode step: fuse_terms into scratch, sample; terms: [(logits_ptr, n, "
          "token_map, token_weights, weight, transform)]; GIL released throughout.");

    m.def("build_token_map", &build_token_map_py, py::arg("base_tokens"), py::arg("base_types"),
          py::arg("base_kind"), py::arg("value_tokens"), py::arg("value_types"),
          py::arg("value_kind"),
          "(token_map int32[n], token_weights float32[n], unmatched int32[k]) by exact text.");
    m.def(
        "normalize_token",
        [](const py::bytes& text, const std::string& kind, int32_t token_type) {
            const std::string s = text;
            return py::bytes(ivl::normalize_token(s, ivl::parse_vocab_kind(kind), token_type));
        },
        py::arg("text"), py::arg("kind"), py::arg("token_type") = 1,
        "Bytes a token stands for (kind 'spm' or 'bpe').");
}
