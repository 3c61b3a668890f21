// test_token_map.cpp - normalize_token and build_token_map on synthetic SPM and BPE
// vocabularies (cases of tests/test_token_map_core.py), plus a 262,144-token vocabulary.
// No SIMD here: run on every architecture for the byte handling (char is unsigned on
// aarch64, signed on x86-64).
#include <string>
#include <utility>
#include <vector>

#include "check.h"
#include "core/token_map.h"

namespace ivl::test {

namespace {

std::string utf8(uint32_t cp) {
    std::string s;
    if (cp < 0x80) {
        s += static_cast<char>(cp);
    } else if (cp < 0x800) {
        s += static_cast<char>(0xC0 | (cp >> 6));
        s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
        s += static_cast<char>(0xE0 | (cp >> 12));
        s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    return s;
}

// GPT-2's bytes_to_unicode, written independently: printable bytes keep their code point,
// the other 68 get U+0100 + their rank.
std::vector<std::string> gpt2_table() {
    std::vector<std::string> table(256);
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
        const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        table[b] = utf8(printable ? b : 256 + extra++);
    }
    return table;
}

std::string bpe_text(const std::string& raw) {
    static const std::vector<std::string> table = gpt2_table();
    std::string out;
    for (const char c : raw) out += table[static_cast<unsigned char>(c)];
    return out;
}

const std::string kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

void normalization() {
    const std::pair<std::string, std::string> spm[] = {
        {kSpace + "hello", " hello"},
        {kSpace + kSpace + "x" + kSpace, "  x "},
        {"<0x0A>", "\n"},
        {"<0xff>", "\xff"},
        {"<0xZZ>", "<0xZZ>"},
        {"caf\xC3\xA9", "caf\xC3\xA9"},
        {"", ""},
    };
    for (const auto& [text, bytes] : spm) {
        check(normalize_token(text, VocabKind::spm) == bytes, "spm normalises '" + text + "'");
    }
    const auto table = gpt2_table();
    check(table[' '] == "\xC4\xA0" && table['\n'] == "\xC4\x8A", "GPT-2 table: G-dot is space");
    bool all = true;
    for (int b = 0; b < 256; ++b) {
        all = all && normalize_token(table[b], VocabKind::bpe) == std::string(1, char(b));
    }
    check(all, "bpe normalises all 256 byte-level characters");
    const std::string raw = "h\xC3\xA9llo w\xC3\xB6rld\n\t\xE2\x82\xAC";  // "héllo wörld\n\t€"
    check(normalize_token(bpe_text(raw), VocabKind::bpe) == raw, "bpe round trip of UTF-8 text");
    check(normalize_token("\xC4\xA0hello", VocabKind::bpe) == " hello", "bpe 'Ghello'");
    check(normalize_token("\xE4\xB8\xAD", VocabKind::bpe) == "\xE4\xB8\xAD",
          "bpe keeps a character outside the table");
    check(normalize_token(kSpace + "a", VocabKind::spm, kTokenUserDefined) == kSpace + "a",
          "spm user-defined tokens are literal");
    check(normalize_token("\xC4\xA0" "a", VocabKind::bpe, kTokenUserDefined) == "\xC4\xA0" "a",
          "bpe user-defined tokens are literal");
    check(normalize_token("\xFF\xC3", VocabKind::bpe) == "\xFF\xC3",
          "bpe keeps malformed UTF-8 bytes");
    check_throws("unknown vocabulary kind", "vocabulary kind must be 'spm' or 'bpe'",
                 [] { parse_vocab_kind("wordpiece"); });
    check(parse_vocab_kind("spm") == VocabKind::spm && parse_vocab_kind("bpe") == VocabKind::bpe,
          "parse_vocab_kind");
}

using Vocab = std::vector<std::pair<std::string, int32_t>>;

TokenMap build(const Vocab& base, const Vocab& value, VocabKind base_kind, VocabKind value_kind) {
    std::vector<std::string> base_tokens, value_tokens;
    std::vector<int32_t> base_types, value_types;
    for (const auto& [text, type] : base) base_tokens.push_back(text), base_types.push_back(type);
    for (const auto& [text, type] : value) value_tokens.push_back(text), value_types.push_back(type);
    return build_token_map(base_tokens, base_types.data(), base_kind, value_tokens,
                           value_types.data(), value_kind);
}

void check_map(const std::string& name, const TokenMap& map, const std::vector<int32_t>& ids,
               const std::vector<int32_t>& unmatched) {
    std::vector<float> weights;
    for (const int32_t id : ids) weights.push_back(id >= 0 ? 1.0f : 0.0f);
    check(map.token_map == ids, name + ": token_map");
    check(map.token_weights == weights, name + ": token_weights");
    check(map.unmatched == unmatched, name + ": unmatched");
}

void maps() {
    const Vocab spm_base = {
        {"<unk>", kTokenUnknown},       // 0 -> -1, not unmatched
        {"<s>", kTokenControl},         // 1 -> -1
        {kSpace + "the", kTokenNormal}, // 2 -> 2 ("Gthe" normal beats " the" user-defined)
        {"the", kTokenNormal},          // 3 -> 3 (lowest id of two "the")
        {"<0x0A>", kTokenByte},         // 4 -> 5 ("C-dot")
        {kSpace + "zebra", kTokenNormal},  // 5 -> unmatched (the value's is a control token)
        {"<unused0>", kTokenUnused},    // 6 -> -1
        {"<tag>", kTokenUserDefined},   // 7 -> 6
        {kSpace, kTokenNormal},         // 8 -> 8 ("G-dot")
        {"xyz", kTokenNormal},          // 9 -> unmatched
        {"", kTokenNormal},             // 10 -> -1, nothing to match
    };
    const Vocab bpe_value = {
        {"<|endoftext|>", kTokenControl}, {" the", kTokenUserDefined},
        {"\xC4\xA0the", kTokenNormal},    {"the", kTokenNormal},
        {"the", kTokenNormal},            {"\xC4\x8A", kTokenNormal},
        {"<tag>", kTokenUserDefined},     {"\xC4\xA0zebra", kTokenControl},
        {"\xC4\xA0", kTokenNormal},       {"xyz", kTokenUnused},
    };
    check_map("spm base onto bpe value", build(spm_base, bpe_value, VocabKind::spm, VocabKind::bpe),
              {-1, -1, 2, 3, 5, -1, -1, 6, 8, -1, -1}, {5, 9});

    const Vocab bpe_base = {{"\xC4\xA0the", kTokenNormal}, {"\xC4\x8A", kTokenNormal},
                            {"<|im_start|>", kTokenControl}, {"\xC3\x83\xC2\xA9", kTokenNormal},
                            {"zz", kTokenNormal}};
    const Vocab spm_value = {{"<unk>", kTokenUnknown}, {"<0x0A>", kTokenByte},
                             {kSpace + "the", kTokenNormal}, {"\xC3\xA9", kTokenNormal},
                             {"<|im_start|>", kTokenNormal}};
    check_map("bpe base onto spm value", build(bpe_base, spm_value, VocabKind::bpe, VocabKind::spm),
              {2, 1, -1, 3, -1}, {4});

    Vocab same = {{"<s>", kTokenControl}};
    for (int b = 0; b < 256; ++b) same.push_back({bpe_text(std::string(1, char(b))), kTokenNormal});
    for (const char* w : {" hello", " world", "ing", "\n\n"}) same.push_back({bpe_text(w), kTokenNormal});
    std::vector<int32_t> identity;
    for (size_t i = 0; i < same.size(); ++i) identity.push_back(static_cast<int32_t>(i));
    check_map("same vocabulary maps to itself", build(same, same, VocabKind::bpe, VocabKind::bpe),
              identity, {});

    const Vocab chat_base = {{"<|im_end|>", kTokenControl},    {"<|endoftext|>", kTokenControl},
                             {"<end_of_turn>", kTokenControl}, {"<|im_start|>", kTokenControl},
                             {"hi", kTokenNormal},             {"<s>", kTokenControl}};
    const Vocab chat_value = {{"hi", kTokenNormal},          {"<|endoftext|>", kTokenControl},
                              {"<|im_end|>", kTokenControl}, {"<|im_start|>", kTokenNormal},
                              {"<end_of_turn>", kTokenUserDefined},
                              {"<|im_end|>", kTokenControl}, {"<s>", kTokenNormal}};
    check_map("control tokens map only to control tokens of identical text",
              build(chat_base, chat_value, VocabKind::bpe, VocabKind::bpe), {2, 1, -1, -1, 0, -1},
              {});
}

// A Gemma-sized SPM base against a BPE value holding every other word, in another order.
void full_size_vocabulary() {
    const int32_t n = 262'144;
    Vocab base, value;
    for (int32_t i = 0; i < n; ++i) base.push_back({kSpace + "w" + std::to_string(i), kTokenNormal});
    for (int32_t i = n - 2; i >= 0; i -= 2) {
        value.push_back({"\xC4\xA0w" + std::to_string(i), kTokenNormal});
    }
    const TokenMap map = build(base, value, VocabKind::spm, VocabKind::bpe);
    bool ok = map.token_map.size() == size_t(n) && map.unmatched.size() == size_t(n / 2);
    for (int32_t i = 0; ok && i < n; ++i) {
        const int32_t want = i % 2 == 0 ? (n - 2 - i) / 2 : -1;
        ok = map.token_map[i] == want && map.token_weights[i] == (want >= 0 ? 1.0f : 0.0f);
    }
    for (int32_t k = 0; ok && k < n / 2; ++k) ok = map.unmatched[k] == 2 * k + 1;
    check(ok, "262,144-token spm base onto a 131,072-token bpe value");
}

}  // namespace

void test_token_map() {
    normalization();
    maps();
    full_size_vocabulary();
}

}  // namespace ivl::test
