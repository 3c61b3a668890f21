"""Generate the ifeval task's prompts and programmatic demonstrations (deterministic: fixed seed).

    python data/make_ifeval.py          # rewrites data/ifeval_{train,valid,test}.jsonl

A prompt is a base request (a question, a description, a list or a note about one of the
hand-written topics in data/ifeval_topics.py) followed by 1-3 IFEval instructions worded by
their own checkers (ivl_local.eval.ifeval.describe). Splits:

- by topic: every base request of a topic is in one split only (32 train / 8 valid / 8 test);
- by instruction combination (the sorted set of instruction ids): each combination allowed by
  IFEval's own conflict table belongs to one split only, so no combination seen in training
  is tested; every instruction of valid/test occurs in some train combination.

Every prompt kept has a *witness*: an answer built here from the topic's sentences
(`build_answer`) that passes all of its checkers, strict. A prompt whose witness fails is
redrawn, so every prompt is satisfiable. On train rows the witness is the demonstration (the
assistant message, "source": "programmatic"); on valid/test rows it is only kept as
`witness` (the models never see it). benchmarks/make_ifeval_demos.py adds answers sampled
from local instruct models.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from ifeval_topics import TOPICS  # noqa: E402
from ivl_local.eval.ifeval import INSTRUCTIONS, describe, verify  # noqa: E402

SEED = 20261201
SPLIT_TOPICS = {"test": 8, "valid": 8}          # the rest train
SPLIT_COMBOS = {"test": 0.2, "valid": 0.15}     # share of the allowed combinations; rest train
PROMPTS_PER_REQUEST = {"train": 6, "valid": 6, "test": 10}
SIZE_WEIGHTS = {1: 0.3, 2: 0.4, 3: 0.3}         # instructions per prompt
MAX_TRIES = 40                                  # draws per prompt before giving up on it

KINDS = ("question", "description", "list", "note")
REQUESTS = {
    "description": ["Describe {d} in a few sentences.", "Write a short description of {d}.",
                    "Tell me what {d} is like."],
    "list": ["List a few facts about {a}.", "Give me some facts about {a}.",
             "What are some interesting things about {a}?"],
    "note": ["Write a short note to {r} about {a}.", "Write a brief message to {r} telling them about {a}."],
}
RECIPIENTS = ["a friend", "your neighbour", "a classmate", "your grandmother", "a colleague"]
# Words a prompt may require or forbid (our own list of common words).
KEYWORDS = ["history", "simple", "journey", "family", "morning", "future", "music", "friend", "season",
            "energy", "balance", "careful", "wonder", "story", "nature", "people", "patience", "colour",
            "reason", "surprise", "village", "ocean", "garden", "weather", "island", "safety", "lesson"]
# Questions, so the checker's wording ("... this exact phrase X. No other words ...") reads well.
END_PHRASES = ["Any other questions?", "Is there anything else I can help with?",
               "Does that answer your question?", "Would you like to know more?"]
FILLERS = ["It is a subject worth learning more about.", "There is always more to discover.",
           "I hope this answer is useful.", "People have been curious about this for a long time.",
           "Small details like these make the world more interesting."]
POSTSCRIPTS = ["I can tell you more if you like.", "Thanks for the interesting question.",
               "A library book on this would be a good next step."]
PLACEHOLDERS = ["[name]", "[date]", "[place]", "[address]"]
FIRST_WORDS = {"first": ["first", "today", "here"], "middle": ["also", "then", "next"],
               "last": ["finally", "overall", "lastly"]}
_WORD = re.compile(r"[A-Za-z]+")
_STOPWORDS = {"about", "their", "there", "which", "other", "these", "those", "where", "after", "before",
              "every", "often", "under", "would", "could", "while", "until", "years", "really"}


# --- base requests -------------------------------------------------------------------------

def base_requests(rng: random.Random) -> list[dict]:
    out = []
    for slug, describe_as, about, question, sentences in TOPICS:
        for kind in KINDS:
            if kind == "question":
                request = question
            else:
                request = rng.choice(REQUESTS[kind]).format(d=describe_as, a=about, r=rng.choice(RECIPIENTS))
            out.append({"base_id": f"{slug}/{kind}", "topic": slug, "kind": kind, "request": request,
                        "title": describe_as[0].upper() + describe_as[1:], "about": about,
                        "sentences": list(sentences)})
    return out


# --- instruction combinations ------------------------------------------------------------

def conflicts() -> dict[str, set[str]]:
    """IFEval's conflict table (made symmetric, as its generator does), on this task's ids."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, conflict_make

    table = conflict_make(copy.deepcopy(INSTRUCTION_CONFLICTS))
    return {i: {j for j in table[i] if j in INSTRUCTIONS} for i in INSTRUCTIONS}


def allowed_combinations() -> list[tuple[str, ...]]:
    table = conflicts()
    combos = []
    for size in SIZE_WEIGHTS:
        for combo in itertools.combinations(sorted(INSTRUCTIONS), size):
            if all(b not in table[a] for a, b in itertools.combinations(combo, 2)):
                combos.append(combo)
    return combos


def split_combinations(rng: random.Random) -> dict[str, list[tuple[str, ...]]]:
    """Each combination in one split; per size, so every split has combinations of each size."""
    out: dict[str, list] = {"train": [], "valid": [], "test": []}
    by_size: dict[int, list] = {}
    for combo in allowed_combinations():
        by_size.setdefault(len(combo), []).append(combo)
    for size, combos in sorted(by_size.items()):
        rng.shuffle(combos)
        n_test = max(1, round(len(combos) * SPLIT_COMBOS["test"]))
        n_valid = max(1, round(len(combos) * SPLIT_COMBOS["valid"]))
        out["test"] += combos[:n_test]
        out["valid"] += combos[n_test:n_test + n_valid]
        out["train"] += combos[n_test + n_valid:]
    return out


# --- kwargs --------------------------------------------------------------------------------

def content_words(sentences: list[str]) -> list[str]:
    words = {w.lower() for s in sentences for w in _WORD.findall(s) if len(w) >= 5}
    return sorted(words - _STOPWORDS)


def draw_kwargs(iid: str, base: dict, rng: random.Random, n_paragraphs: int | None = None) -> dict:
    if iid == "keywords:existence":
        return {"keywords": rng.sample(KEYWORDS, rng.choice([1, 2]))}
    if iid == "keywords:frequency":
        return {"keyword": rng.choice(KEYWORDS), "frequency": rng.randint(1, 3),
                "relation": rng.choice(["less than", "at least"])}
    if iid == "keywords:forbidden_words":
        pool = content_words(base["sentences"]) if rng.random() < 0.5 else KEYWORDS
        return {"forbidden_words": rng.sample(pool, rng.choice([1, 2]))}
    if iid == "keywords:letter_frequency":
        return {"letter": rng.choice("abcdefghiklmnoprstuwy"), "let_frequency": rng.randint(1, 10),
                "let_relation": rng.choice(["less than", "at least"])}
    if iid == "length_constraints:number_paragraphs":
        return {"num_paragraphs": rng.randint(2, 4)}
    if iid == "length_constraints:number_words":
        relation = rng.choice(["less than", "at least"])
        return {"num_words": rng.choice([15, 25, 40, 60] if relation == "less than" else [10, 20, 30, 50]),
                "relation": relation}
    if iid == "length_constraints:nth_paragraph_first_word":
        num = rng.randint(2, 3)
        nth = rng.randint(1, num)
        where = "first" if nth == 1 else "last" if nth == num else "middle"
        return {"num_paragraphs": num, "nth_paragraph": nth, "first_word": rng.choice(FIRST_WORDS[where])}
    if iid == "detectable_content:number_placeholders":
        return {"num_placeholders": rng.randint(1, 3)}
    if iid == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(["P.S.", "P.P.S"])}
    if iid == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.randint(2, 4)}
    if iid == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.randint(1, 3)}
    if iid == "detectable_format:multiple_sections":
        return {"section_spliter": rng.choice(["Section", "SECTION"]), "num_sections": rng.randint(2, 3)}
    if iid == "combination:repeat_prompt":
        return {"prompt_to_repeat": base["request"]}
    if iid == "startend:end_checker":
        return {"end_phrase": rng.choice(END_PHRASES)}
    return {}   # json_format, title, two_responses, quotation, english_capital/lowercase, no_comma


# --- the programmatic answer ---------------------------------------------------------------

def _groups(units: list[str], n: int) -> list[list[str]]:
    """`units` in n non-empty consecutive groups (fillers added when there are fewer than n)."""
    units = list(units)
    for filler in FILLERS:
        if len(units) >= n:
            break
        units.append(filler)
    size, extra = divmod(len(units), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(units[start:end])
        start = end
    return out


def _count(word: str, text: str) -> int:
    return len(re.findall(word, text, flags=re.IGNORECASE))   # as the checker counts (substrings)


def build_answer(base: dict, instructions: list[tuple[str, dict]]) -> str:
    """An answer to base["request"] meant to satisfy every instruction (the caller verifies)."""
    spec = dict(instructions)
    units = list(base["sentences"])
    if base["kind"] == "note":
        units.insert(0, f"I wanted to tell you about {base['about']}.")

    # Content: drop sentences with forbidden words / too many of a keyword; add required words.
    forbidden = spec.get("keywords:forbidden_words", {}).get("forbidden_words", [])
    units = [u for u in units if not any(re.search(rf"\b{w}\b", u, re.IGNORECASE) for w in forbidden)]
    freq = spec.get("keywords:frequency")
    if freq and freq["relation"] == "less than":
        while units and _count(freq["keyword"], " ".join(units)) >= freq["frequency"]:
            units.pop(next(i for i, u in enumerate(units) if _count(freq["keyword"], u)))
    if not units:
        units = [FILLERS[0]]
    for word in spec.get("keywords:existence", {}).get("keywords", []):
        if not _count(word, " ".join(units)):
            units.append(f"It also makes me think of the word {word}.")
    if freq and freq["relation"] == "at least":
        for _ in range(freq["frequency"] - _count(freq["keyword"], " ".join(units))):
            units.append(f"The word {freq['keyword']} fits here too.")
    words = spec.get("length_constraints:number_words")
    if words and words["relation"] == "less than":
        while len(units) > 1 and len(_WORD.findall(" ".join(units))) >= words["num_words"]:
            units.pop()
    if words and words["relation"] == "at least":
        for filler in FILLERS:
            if len(re.findall(r"\w+", " ".join(units))) >= words["num_words"]:
                break
            units.append(filler)
    placeholders = spec.get("detectable_content:number_placeholders")
    if placeholders:
        units.append("You can add " + " and ".join(PLACEHOLDERS[:placeholders["num_placeholders"]]) + " later.")
    highlights = spec.get("detectable_format:number_highlighted_sections")
    if highlights:
        for i in range(min(highlights["num_highlights"], len(units))):
            units[i] = f"*{units[i]}*"

    # Layout.
    def body(units: list[str]) -> str:
        if "detectable_format:number_bullet_lists" in spec:
            mark = "-" if highlights else "*"
            groups = _groups(units, spec["detectable_format:number_bullet_lists"]["num_bullets"])
            return "\n".join(f"{mark} " + " ".join(g) for g in groups)
        if "length_constraints:number_paragraphs" in spec:
            groups = _groups(units, spec["length_constraints:number_paragraphs"]["num_paragraphs"])
            return "\n\n***\n\n".join(" ".join(g) for g in groups)
        if "length_constraints:nth_paragraph_first_word" in spec:
            nth = spec["length_constraints:nth_paragraph_first_word"]
            groups = _groups(units, nth["num_paragraphs"])
            lead = groups[nth["nth_paragraph"] - 1]
            lead[0] = nth["first_word"].capitalize() + " " + lead[0][0].lower() + lead[0][1:]
            return "\n\n".join(" ".join(g) for g in groups)
        if "detectable_format:multiple_sections" in spec:
            sections = spec["detectable_format:multiple_sections"]
            groups = _groups(units, sections["num_sections"])
            return "\n\n".join(f"{sections['section_spliter']} {i}\n" + " ".join(g) for i, g in enumerate(groups, 1))
        if base["kind"] == "list":
            return "\n".join(f"{i}. {u}" for i, u in enumerate(units, 1))
        if base["kind"] == "note":
            return "Hello,\n\n" + " ".join(units) + "\n\nBest wishes,\nSam"
        return " ".join(units)

    text = body(units)
    if "combination:two_responses" in spec:
        text = text + "\n******\n" + body(units[1:] + units[:1] if len(units) > 1 else units + [FILLERS[2]])
    if "detectable_format:title" in spec:
        text = f"<<{base['title']}>>\n" + text
    if "combination:repeat_prompt" in spec:
        text = spec["combination:repeat_prompt"]["prompt_to_repeat"] + "\n" + text
    if "detectable_content:postscript" in spec:
        marker = spec["detectable_content:postscript"]["postscript_marker"].rstrip(".") + "."
        text += f"\n{marker} {POSTSCRIPTS[len(base['request']) % len(POSTSCRIPTS)]}"
    if "startend:end_checker" in spec:
        text += "\n" + spec["startend:end_checker"]["end_phrase"]
    if "startend:quotation" in spec:
        text = f'"{text}"'
    if "detectable_format:json_format" in spec:
        text = json.dumps({"answer": text}, ensure_ascii=False)
    if "change_case:english_capital" in spec:
        text = text.upper()
    if "change_case:english_lowercase" in spec:
        text = text.lower()
    if "punctuation:no_comma" in spec:
        text = text.replace(",", "")
    return text


# --- prompts -------------------------------------------------------------------------------

def prompt_text(request: str, instructions: list[tuple[str, dict]]) -> str:
    """The request, then each instruction in the checkers' words; one spanning several lines
    (sections, bullets) goes last, so the next one does not start on its example's line."""
    texts = sorted((describe(iid, kwargs) for iid, kwargs in instructions), key=lambda t: "\n" in t)
    return " ".join([request] + texts)


def make_rows(split: str, requests: list[dict], combos: list[tuple], rng: random.Random) -> list[dict]:
    by_size: dict[int, list] = {}
    for combo in combos:
        by_size.setdefault(len(combo), []).append(combo)
    sizes, weights = zip(*[(s, w) for s, w in SIZE_WEIGHTS.items() if s in by_size])
    rows = []
    for base in requests:
        used: set[tuple] = set()
        for _ in range(PROMPTS_PER_REQUEST[split]):
            for _ in range(MAX_TRIES):
                combo = rng.choice(by_size[rng.choices(sizes, weights)[0]])
                if combo in used:
                    continue
                order = list(combo)
                rng.shuffle(order)
                instructions = [(iid, draw_kwargs(iid, base, rng)) for iid in order]
                answer = build_answer(base, instructions)
                prompt = prompt_text(base["request"], instructions)
                ids, kwargs = [i for i, _ in instructions], [k for _, k in instructions]
                if verify(answer, ids, kwargs, prompt).prompt_strict:
                    used.add(combo)
                    break
            else:
                continue
            row = {"messages": [{"role": "user", "content": prompt}],
                   "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs,
                   "base_id": base["base_id"], "request": base["request"], "combination": "+".join(combo),
                   "task": "ifeval"}
            if split == "train":
                row["messages"].append({"role": "assistant", "content": answer})
                row["source"] = "programmatic (data/make_ifeval.py build_answer)"
            else:
                row["witness"] = answer
            rows.append(row)
    return rows


def make_splits(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    requests = base_requests(rng)
    topics = [t[0] for t in TOPICS]
    rng.shuffle(topics)
    test_topics = set(topics[:SPLIT_TOPICS["test"]])
    valid_topics = set(topics[SPLIT_TOPICS["test"]:SPLIT_TOPICS["test"] + SPLIT_TOPICS["valid"]])
    topic_split = {t: "test" if t in test_topics else "valid" if t in valid_topics else "train" for t in topics}
    combos = split_combinations(rng)
    train_ids = {i for c in combos["train"] for i in c}
    assert train_ids == set(INSTRUCTIONS), "every instruction must occur in training"
    out = {}
    for split in ("train", "valid", "test"):
        mine = [r for r in requests if topic_split[r["topic"]] == split]
        rows = make_rows(split, mine, combos[split], rng)
        if split == "train":
            rng.shuffle(rows)
        out[split] = rows
    return out


def main() -> None:
    for split, rows in make_splits().items():
        path = HERE / f"ifeval_{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{path.name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
