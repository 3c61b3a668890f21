// token_map.h - exact-text map from a base vocabulary onto a value vocabulary.
//
// Usage:
//
//     #include "core/token_map.h"
//
//     ivl::TokenMap map = ivl::build_token_map(base_tokens, base_types.data(), ivl::VocabKind::spm,
//                                              value_tokens, value_types.data(), ivl::VocabKind::bpe);
//     // map.token_map[i]: value id for base id i, or -1; map.token_weights[i]: 1 or 0;
//     // map.unmatched: base ids left for the caller to fill (first token of the value
//     // tokenizer's encoding of the text).
//     std::string bytes = ivl::normalize_token("\xe2\x96\x81hello", ivl::VocabKind::spm);  // " hello"
//
// Token texts are the raw strings stored in the GGUF vocabulary; types are llama.cpp's
// (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte). Normalising gives the
// bytes the token stands for, as llama.cpp's token_to_piece would:
//   - spm: U+2581 '▁' -> ' ', a token "<0xNN>" -> the byte NN;
//   - bpe: GPT-2 byte-level text -> bytes (printable bytes stand for themselves, the other 68
//     bytes for U+0100 + their rank, so 'Ġ' = ' ' and 'Ċ' = '\n'); a character outside the
//     table keeps its UTF-8 bytes;
//   - user-defined tokens (4) are literal text in both kinds.
// Matching: a control token (3) maps to the value's control token with the identical stored
// text (e.g. "<|im_end|>" in two ChatML vocabularies), else to -1; base tokens of type 2/3/5
// are never "unmatched"; value tokens of those types are never targets of other types; a
// base token whose normalised bytes equal a value token's
// maps to it with weight 1. Several value tokens with the same bytes: a normal one first,
// then the lowest id. Base tokens that normalise to no bytes map to -1 and are not listed.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ivl {

enum class VocabKind { spm, bpe };

enum TokenType : int32_t {
    kTokenUndefined = 0,
    kTokenNormal = 1,
    kTokenUnknown = 2,
    kTokenControl = 3,
    kTokenUserDefined = 4,
    kTokenUnused = 5,
    kTokenByte = 6,
};

// "spm" | "bpe"; throws std::invalid_argument otherwise.
VocabKind parse_vocab_kind(std::string_view kind);

std::string normalize_token(std::string_view text, VocabKind kind,
                            int32_t token_type = kTokenNormal);

struct TokenMap {
    std::vector<int32_t> token_map;     // n_base, value id or -1
    std::vector<float> token_weights;   // n_base, 1 where mapped, else 0
    std::vector<int32_t> unmatched;     // base ids (ascending) with no exact match
};

TokenMap build_token_map(const std::vector<std::string>& base_tokens, const int32_t* base_types,
                         VocabKind base_kind, const std::vector<std::string>& value_tokens,
                         const int32_t* value_types, VocabKind value_kind);

}  // namespace ivl
