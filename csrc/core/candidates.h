// candidates.h - the (token id, logit) pair the sampler chain works on.
#pragma once

#include <cstdint>

namespace ivl {

struct Candidate {
    int32_t id;
    float logit;
};

// Canonical order of candidates: higher logit first, ties broken by the lower token id.
// A total order, so any correct sort or selection gives the same sequence on every platform.
inline bool candidate_before(const Candidate& a, const Candidate& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

}  // namespace ivl
