// token_map.cpp - token text normalisation (SentencePiece, GPT-2 byte-level) and matching.
#include "token_map.h"

#include <array>
#include <stdexcept>
#include <unordered_map>

namespace ivl {

namespace {

bool excluded_type(int32_t type) {
    return type == kTokenUnknown || type == kTokenControl || type == kTokenUnused;
}

// GPT-2's bytes_to_unicode, inverted: code point -> byte, or -1 if not in the table.
struct ByteLevelTable {
    std::array<int16_t, 256 + 68> byte_of{};
    ByteLevelTable() {
        byte_of.fill(-1);
        int next = 0;
        for (int b = 0; b < 256; ++b) {
            const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
            if (printable) {
                byte_of[b] = static_cast<int16_t>(b);
            } else {
                byte_of[256 + next++] = static_cast<int16_t>(b);
            }
        }
    }
};

const ByteLevelTable& byte_level_table() {
    static const ByteLevelTable table;
    return table;
}

// Decodes one UTF-8 sequence at text[i]; returns its length (0 when malformed).
size_t utf8_decode(std::string_view text, size_t i, uint32_t& cp) {
    const auto byte = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
    const unsigned char c = byte(i);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || i + len > text.size()) return 0;
    cp = len == 1 ? c : (c & (0x7F >> len));
    for (size_t k = 1; k < len; ++k) {
        if ((byte(i + k) & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (byte(i + k) & 0x3F);
    }
    return len;
}

int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

std::string normalize_spm(std::string_view text) {
    if (text.size() == 6 && text.substr(0, 3) == "<0x" && text[5] == '>') {
        const int hi = hex_digit(text[3]), lo = hex_digit(text[4]);
        if (hi >= 0 && lo >= 0) return std::string(1, static_cast<char>(hi * 16 + lo));
    }
    static constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size();) {
        if (text.compare(i, kSpace.size(), kSpace) == 0) {
            out.push_back(' ');
            i += kSpace.size();
        } else {
            out.push_back(text[i++]);
        }
    }
    return out;
}

std::string normalize_bpe(std::string_view text) {
    const auto& table = byte_level_table();
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size();) {
        uint32_t cp = 0;
        const size_t len = utf8_decode(text, i, cp);
        if (len == 0) {  // malformed UTF-8: keep the byte
            out.push_back(text[i++]);
            continue;
        }
        if (cp < table.byte_of.size() && table.byte_of[cp] >= 0) {
            out.push_back(static_cast<char>(table.byte_of[cp]));
        } else {
            out.append(text.substr(i, len));  // outside the table: literal UTF-8
        }
        i += len;
    }
    return out;
}

}  // namespace

VocabKind parse_vocab_kind(std::string_view kind) {
    if (kind == "spm") return VocabKind::spm;
    if (kind == "bpe") return VocabKind::bpe;
    throw std::invalid_argument("vocabulary kind must be 'spm' or 'bpe', got '" +
                                std::string(kind) + "'");
}

std::string normalize_token(std::string_view text, VocabKind kind, int32_t token_type) {
    if (token_type == kTokenUserDefined) return std::string(text);
    return kind == VocabKind::spm ? normalize_spm(text) : normalize_bpe(text);
}

TokenMap build_token_map(const std::vector<std::string>& base_tokens, const int32_t* base_types,
                         VocabKind base_kind, const std::vector<std::string>& value_tokens,
                         const int32_t* value_types, VocabKind value_kind) {
    // Normalised bytes -> best value id (normal type first, then lowest id).
    std::unordered_map<std::string, int32_t> by_text;
    by_text.reserve(value_tokens.size() * 2);
    for (size_t j = 0; j < value_tokens.size(); ++j) {
        const int32_t type = value_types[j];
        if (excluded_type(type)) continue;
        std::string key = normalize_token(value_tokens[j], value_kind, type);
        if (key.empty()) continue;
        auto [it, inserted] = by_text.emplace(std::move(key), static_cast<int32_t>(j));
        if (!inserted && type == kTokenNormal && value_types[it->second] != kTokenNormal) {
            it->second = static_cast<int32_t>(j);  // ids ascend: only the type can win here
        }
    }

    // Control tokens match only control tokens with the very same stored text (ChatML's
    // <|im_end|> in two BPE vocabularies): the value's "end the turn" then reaches the
    // base's end-of-turn token. Lowest id wins.
    std::unordered_map<std::string_view, int32_t> control_by_text;
    for (size_t j = 0; j < value_tokens.size(); ++j) {
        if (value_types[j] == kTokenControl && !value_tokens[j].empty()) {
            control_by_text.emplace(value_tokens[j], static_cast<int32_t>(j));
        }
    }

    TokenMap map;
    const size_t n = base_tokens.size();
    map.token_map.assign(n, -1);
    map.token_weights.assign(n, 0.0f);
    for (size_t i = 0; i < n; ++i) {
        const int32_t type = base_types[i];
        if (type == kTokenControl) {
            const auto it = control_by_text.find(base_tokens[i]);
            if (it != control_by_text.end()) {
                map.token_map[i] = it->second;
                map.token_weights[i] = 1.0f;
            }
            continue;
        }
        if (excluded_type(type)) continue;
        const std::string key = normalize_token(base_tokens[i], base_kind, type);
        if (key.empty()) continue;
        const auto it = by_text.find(key);
        if (it == by_text.end()) {
            map.unmatched.push_back(static_cast<int32_t>(i));
        } else {
            map.token_map[i] = it->second;
            map.token_weights[i] = 1.0f;
        }
    }
    return map;
}

}  // namespace ivl
