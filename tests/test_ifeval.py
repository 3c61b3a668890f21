"""The ifeval task: IFEval's checkers (if-verifiable) on hand-made answers, the shipped splits
(disjoint base requests and instruction combinations, every prompt satisfiable), and that no
checker needing NLTK data is ever reached."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ivl_local.errors import DataError
from ivl_local.eval import ifeval
from ivl_local.eval.ifeval import EXCLUDED, INSTRUCTIONS, load_examples, summarize, verify
from ivl_local.eval.task import load_split, split_path

ROOT = Path(__file__).resolve().parents[1]


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in split_path(split, "ifeval").read_text().splitlines()]


# --- the scorer: verdicts on hand-made answers ---------------------------------------------

# (instruction, kwargs, an answer that follows it, one that does not)
CASES = [
    ("keywords:existence", {"keywords": ["ocean", "story"]},
     "The ocean has a long story.", "The sea has a long tale."),
    ("keywords:frequency", {"keyword": "music", "frequency": 2, "relation": "at least"},
     "Music is good. I like music.", "Music is good."),
    ("keywords:frequency", {"keyword": "music", "frequency": 2, "relation": "less than"},
     "Music is good.", "Music is good. I like music."),
    ("keywords:forbidden_words", {"forbidden_words": ["light"]},
     "The lamp shines at night.", "The light shines at night."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     "Zebras zigzag.", "Horses run."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "One part.\n***\nAnother part.", "One part only."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "Four words are here.", "These are six words right here."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "also"},
     "Bees make honey.\n\nAlso, they pollinate flowers.", "Bees make honey.\n\nThey pollinate flowers."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Meet me at [place] on [date].", "Meet me at the park on [date]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Hello there.\nP.S. See you soon.", "Hello there. See you soon."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "* first point\n* second point", "* first point\n* second point\n* third point"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1},
     "This is *important* to know.", "Nothing is highlighted here."),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfirst\nSection 2\nsecond", "Section 1\nonly one"),
    ("detectable_format:json_format", {}, '{"answer": "yes"}', "answer: yes"),
    ("detectable_format:title", {}, "<<On Bees>>\nBees make honey.", "On Bees\nBees make honey."),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "First answer.\n******\nFirst answer."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Describe a kite."},
     "Describe a kite. A kite flies in the wind.", "A kite flies in the wind."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Kites fly. Any other questions?", "Any other questions? Kites fly."),
    ("startend:quotation", {}, '"Kites fly in the wind."', "Kites fly in the wind."),
    ("change_case:english_capital", {}, "THE KITE IS FLYING HIGH IN THE SKY BECAUSE THE WIND IS STRONG TODAY.",
     "The kite is flying high in the sky because the wind is strong today."),
    ("change_case:english_lowercase", {}, "kites fly high in the wind on sunny days.", "Kites fly high in the wind."),
    ("punctuation:no_comma", {}, "Kites fly high and far.", "Kites fly high, and far."),
]


def test_every_instruction_of_the_task_has_a_hand_made_case():
    assert {case[0] for case in CASES} == set(INSTRUCTIONS)
    assert not set(INSTRUCTIONS) & set(EXCLUDED)


@pytest.mark.parametrize("iid, kwargs, good, bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_verdicts_on_hand_made_answers(iid, kwargs, good, bad):
    assert verify(good, [iid], [kwargs]).strict == (True,)
    assert verify(bad, [iid], [kwargs]).strict == (False,)


def test_loose_accepts_what_ifeval_loose_accepts_and_strict_does_not():
    ids, kwargs = ["startend:end_checker", "punctuation:no_comma"], [{"end_phrase": "Any other questions?"}, {}]
    # A trailing line after the phrase: strict fails, loose drops the last line and passes.
    verdict = verify("Kites fly high.\nAny other questions?\nThanks, bye", ids, kwargs)
    assert verdict.strict == (False, False) and verdict.loose == (True, True)
    assert not verdict.prompt_strict and verdict.prompt_loose
    # Markdown bold in a title line: loose also tries the answer without '*' and without line 1.
    title = verify("**Kites**\n<<Kites>> fly", ["detectable_format:title"], [{}])
    assert title.strict == (True,) and title.loose == (True,)


def test_empty_answer_fails_every_instruction():
    v = verify("   ", ["punctuation:no_comma", "detectable_format:title"], [{}, {}])
    assert v.strict == (False, False) and v.loose == (False, False)
    assert verify(None, ["punctuation:no_comma"], [{}]).prompt_strict is False


def test_summary_is_ifevals_prompt_and_pooled_instruction_accuracy():
    ids = ["punctuation:no_comma", "detectable_format:title"]
    answers = ["<<A>> no commas", "<<A>>, a comma", "no title, and a comma"]
    s = summarize([verify(a, ids, [{}, {}]) for a in answers])
    assert s["prompts"] == 3 and s["instructions"] == 6
    assert s["prompt_strict"] == pytest.approx(1 / 3)
    assert s["instruction_strict"] == pytest.approx(3 / 6)     # pooled: 2 + 1 + 0 passes of 6
    assert s["per_instruction_strict"]["detectable_format:title"] == (pytest.approx(2 / 3), 3)


def test_instructions_outside_the_task_are_errors_never_silently_skipped():
    with pytest.raises(DataError, match="punkt"):
        ifeval.check_instructions(["length_constraints:number_sentences"], [{"num_sentences": 2, "relation": "at least"}])
    with pytest.raises(DataError, match="not used"):
        verify("hi", ["keywords:no_such_checker"], [{}])
    with pytest.raises(DataError, match="bad kwargs"):
        ifeval.check_instructions(["keywords:frequency"], [{"keyword": "a", "frequency": 1, "relation": "about"}])


def test_excluded_checkers_really_need_nltk_data_and_the_task_never_reaches_them(tmp_path):
    """In a child with an empty NLTK data path and nltk.download made to fail: the two
    punkt-based checkers raise LookupError, and scoring every shipped test prompt's witness
    touches neither ifbench (which downloads at import) nor the downloader."""
    code = f"""
import sys, nltk
nltk.data.path[:] = [{str(tmp_path)!r}]
def no_download(*a, **k):
    raise SystemExit("nltk.download called")
nltk.download = no_download
from ivl_local.eval.ifeval import load_examples, _registry
from ivl_local.eval.task import split_path
import json
_, registry = _registry()
for iid, kw in [("length_constraints:number_sentences", dict(num_sentences=2, relation="at least")),
                ("change_case:capital_word_frequency", dict(capital_frequency=1, capital_relation="at least"))]:
    checker = registry[iid](iid)
    checker.build_description(**kw)
    try:
        checker.check_following("One. TWO three.")
    except LookupError:
        print("needs-data", iid)
rows = [json.loads(l) for l in split_path("test", "ifeval").read_text().splitlines()]
examples = load_examples(split_path("test", "ifeval"))
passed = sum(e.verdict(r["witness"]).prompt_strict for e, r in zip(examples, rows))
print("witnesses", passed, len(rows))
print("ifbench", "if_verifiable.ifbench" in sys.modules)
"""
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'convert'}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "needs-data length_constraints:number_sentences" in lines
    assert "needs-data change_case:capital_word_frequency" in lines
    n = len(rows("test"))
    assert f"witnesses {n} {n}" in lines
    assert "ifbench False" in lines


# --- the shipped splits --------------------------------------------------------------------

def test_splits_share_no_base_request_topic_or_combination():
    splits = {s: rows(s) for s in ("train", "valid", "test")}
    topics = {s: {r["base_id"].split("/")[0] for r in rs} for s, rs in splits.items()}
    combos = {s: {r["combination"] for r in rs} for s, rs in splits.items()}
    for a, b in (("train", "test"), ("train", "valid"), ("valid", "test")):
        assert not topics[a] & topics[b], (a, b)
        assert not combos[a] & combos[b], (a, b)
    assert 250 <= len(splits["test"]) <= 500
    for s, rs in splits.items():
        for r in rs:
            assert r["combination"] == "+".join(sorted(r["instruction_id_list"]))
            assert 1 <= len(r["instruction_id_list"]) <= 3
    # every instruction tested is also trained on (in other combinations)
    trained = {i for r in splits["train"] for i in r["instruction_id_list"]}
    assert {i for r in splits["test"] for i in r["instruction_id_list"]} <= trained == set(INSTRUCTIONS)


def test_train_demonstrations_pass_every_checker_and_test_rows_hold_no_answer():
    train = load_split("train", task="ifeval")
    assert len(train) >= 500
    for example, row in zip(train, rows("train")):
        assert example.messages[-1]["role"] == "assistant" and row["source"].startswith("programmatic")
        assert example.verdict(example.messages[-1]["content"]).prompt_strict, row["prompt"]
        assert example.prompt_messages == [{"role": "user", "content": row["prompt"]}]
    test = load_split("test", task="ifeval")
    assert all([m["role"] for m in e.messages] == ["user"] for e in test)
    # A non-answer passes few prompts (1 % when written): the task is not won by saying nothing.
    assert summarize([e.verdict("I do not know.") for e in test])["prompt_strict"] < 0.05


def test_generator_is_deterministic():
    """make_ifeval.make_splits reproduces the shipped test split row for row."""
    spec = importlib.util.spec_from_file_location("make_ifeval", ROOT / "data" / "make_ifeval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.make_splits()["test"] == rows("test")


def test_limit_spreads_over_the_split_so_a_subset_covers_every_topic():
    """The splits are written topic by topic; a limit takes rows spread over the file."""
    every = load_split("test", None, "ifeval")
    some = load_split("test", 40, "ifeval")
    assert len(some) == 40 and [e.index for e in some] == sorted(e.index for e in some)
    topics = {e.base_id.split("/")[0] for e in every}
    assert {e.base_id.split("/")[0] for e in some} == topics and len(topics) > 1
    assert some[0].index == every[0].index and len(load_split("test", 10_000, "ifeval")) == len(every)


def test_malformed_rows_are_one_data_error(tmp_path):
    good = rows("test")[0]
    cases = {"not json": "{", "no ids": json.dumps({k: v for k, v in good.items() if k != "instruction_id_list"}),
             "prompt differs": json.dumps(dict(good, prompt="something else")),
             "excluded checker": json.dumps(dict(good, instruction_id_list=["language:response_language"],
                                                 kwargs=[{"language": "fr"}]))}
    for name, line in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(DataError, match="bad.jsonl:1"):
            load_examples(path)


# --- the task in the evaluation harness ----------------------------------------------------

def test_ifeval_plans_have_the_studys_rows():
    from ivl_local.eval import build_plan

    quick = build_plan(quick=True, task="ifeval")
    kinds = {c.kind for c in quick.configs}
    assert {"base", "in-distribution", "full-finetune", "cross-vocab", "proxy-tuning", "alpha-sweep"} <= kinds
    trained = [r for c in quick.configs for r in (c.value, c.base, c.proxy and c.proxy.expert)
               if hasattr(r, "task")]
    assert trained and all(r.task == "ifeval" for r in trained)
    full = {c.name: c for c in build_plan(task="ifeval", installed=lambda name: True).configs}
    for name in ("smollm2 Q4_0 + value", "smollm2 + value[gemma3]", "qwen1.5b + value[qwen0.5b]",
                 "qwen1.5b partial-FT", "qwen1.5b + proxy[smollm2]", "gemma3 + value[smollm2] @a=0.5",
                 "smollm2 + value norm 0"):
        assert name in full
    assert dict(full["smollm2 + value"].value.extra)["max_len"] >= 256
    assert full["smollm2 + value norm 0"].value == replace(full["smollm2 + value"].value, norm_weight=0.0)
    # the reverse direction's value net is Gemma's pruned:4 copy, as in the arithmetic plan
    # (a fresh llama did not learn there); the quick plan keeps the cheap fresh one
    assert full["gemma3 + value"].value.init == "pruned:4"
    assert full["smollm2 + value[gemma3]"].value is full["gemma3 + value"].value
    # the norm-0 twins carry their rows' kinds, so the report pairs them with their own recipe
    twins = {"smollm2 + value norm 0": "smollm2 + value", "gemma3 + value[smollm2] norm 0": "gemma3 + value[smollm2]",
             "smollm2 Q4_0 + value norm 0": "smollm2 Q4_0 + value", "gemma3 + value norm 0": "gemma3 + value",
             "smollm2 + value[gemma3] norm 0": "smollm2 + value[gemma3]",
             "qwen1.5b + value[smollm2] norm 0": "qwen1.5b + value[smollm2]"}
    for twin, row in twins.items():
        assert full[twin].kind == full[row].kind and full[twin].base == full[row].base
        assert full[twin].value == replace(full[row].value, norm_weight=0.0)
    for swept in ("smollm2 + value norm 0 @a=1.5", "gemma3 + value[smollm2] norm 0 @a=1.25"):
        assert full[swept].kind == "alpha-sweep" and full[swept].value == full["smollm2 + value norm 0"].value
    gemma_extra = dict(full["gemma3 + value"].value.extra)
    assert gemma_extra["max_len"] == 320 and "learning_rate" not in gemma_extra   # the trainer's 1e-4


def test_quick_structure_with_the_real_scorer(tmp_path):
    """The --quick ifeval plan through run_eval with a fake workspace and runners that answer
    with the witnesses (the base alone: none): real prompts, real scorer, real report."""
    from ivl_local.eval import Plan, build_plan, run_eval

    witness_of = {r["prompt"]: r["witness"] for r in rows("test")}
    created = []

    class WitnessRunner:
        def __init__(self, base, value, token_map, seed, torch_gguf, value_prompt="own", terms=(), n_ctx=256):
            self.value, self.terms, self.alpha, self.n_ctx = value, terms, 1.0, n_ctx
            created.append(self)

        def answer_all(self, conversations, max_tokens, advance=lambda: None):
            helped = self.value is not None or bool(self.terms)
            out = [witness_of[c[0]["content"]] if helped and self.alpha > 0 else "I do not know."
                   for c in conversations]
            for _ in out:
                advance()
            return out

        def close(self):
            pass

    class Workspace:
        def model(self, ref):
            return tmp_path / ((ref if isinstance(ref, str) else ref.label).replace(" ", "_") + ".gguf")

        def token_map(self, spec):
            return tmp_path / "map.npz"

        def describe(self, path):
            return {"file": str(path), "sha256": "0123456789ab"}

    plan = build_plan(quick=True, task="ifeval")
    report = run_eval(Plan(plan.configs), task="ifeval", quick=True, out_dir=tmp_path, workspace=Workspace(),
                      runner_factory=WitnessRunner, progress=False, log=lambda line: None)
    assert report.meta["max_tokens"] == 64 and "IFEval" in report.meta["scorer"]
    assert {r.n_ctx for r in created} == {1024}
    assert report.results["smollm2"].metrics["prompt_strict"] < 0.2
    assert report.results["smollm2 + value"].score == 1.0 == report.results["smollm2 + value"].metrics["instruction_loose"]
    md = (tmp_path / "quick" / "results.md").read_text()
    assert "## IFEval accuracies" in md and "| smollm2 + value | 1.000 | 1.000 | 1.000 | 1.000 |" in md


@pytest.mark.real
def test_real_base_answers_ifeval_prompts(tmp_path, smollm2_path):
    """SmolLM2 alone on 3 test prompts through the real runner, at the task's context and
    answer length: every prompt fits, answers are scored and the report is written."""
    from ivl_local.eval import EvalConfig, run_eval

    report = run_eval([EvalConfig("smollm2", "base", "smollm2-135m")], task="ifeval", limit=3, max_tokens=48,
                      out_dir=tmp_path, progress=False, log=lambda line: None)
    result = report.results["smollm2"]
    assert result.n == 3 and all(a.strip() for a in result.answers)
    assert result.metrics["instructions"] == sum(len(e.instruction_ids) for e in load_split("test", 3, "ifeval"))
    assert (tmp_path / "results.md").exists()


def test_goals_of_the_issue_from_a_report(tmp_path, capsys):
    """ifeval_goals judges each goal from the per-item scores: the share of full FT's gain,
    the cross-vocabulary gain and its share of the own-base gain, IVL - proxy; goals whose
    rows were not run say 'not measured'; alpha-sweep rows are ignored."""
    from ivl_local.eval import ifeval_goals

    def row(name, kind, base, value, ones, alpha=1.0):
        scores = [1.0] * ones + [0.0] * (10 - ones)
        return {"name": name, "kind": kind, "base": base, "value": value, "alpha": alpha, "scores": scores,
                "metrics": {"per_instruction_strict": {"punctuation:no_comma": [ones / 10, 10]}}}

    value = "value[smollm2-135m, ifeval]"
    report = {"meta": {"task": "ifeval", "split": "test"}, "results": [
        row("smollm2", "base", "smollm2-135m", "-", 0),
        row("gemma3", "base", "gemma3-270m", "-", 0),
        row("smollm2 + value", "in-distribution", "smollm2-135m", value, 5),
        row("smollm2 full-FT", "full-finetune", "smollm2-135m full-FT ifeval", "-", 6),
        row("gemma3 + value[smollm2]", "cross-vocab", "gemma3-270m", value, 4),
        row("gemma3 + value[smollm2] @a=0.5", "alpha-sweep", "gemma3-270m", value, 9, alpha=0.5),
        row("gemma3 + proxy[smollm2]", "proxy-tuning", "gemma3-270m",
            "proxy[smollm2-135m full-FT ifeval - smollm2-135m]", 5)]}
    got = {g["goal"]: g for g in ifeval_goals.goals(report)}
    share = got["smollm2 + value: >= 90% of smollm2 full-FT's gain"]
    assert share["value"] == pytest.approx(5 / 6) and share["verdict"] == "missed"
    assert got["gemma3 + value[smollm2]: gain clearly above 0"]["verdict"] == "met"
    cross = got["gemma3 + value[smollm2]: >= 70% of the gain on its own base (smollm2 + value)"]
    assert cross["value"] == pytest.approx(0.8) and cross["verdict"] == "met"
    versus = got["gemma3 + value[smollm2] >= gemma3 + proxy[smollm2]"]
    assert versus["value"] == pytest.approx(-0.1) and versus["verdict"].startswith("level")   # CI holds 0
    assert got["across vocabularies in both directions"]["verdict"].startswith("not measured")
    assert sum(g["verdict"] == "not measured" for g in got.values()) == 1   # Qwen same family
    ids, table = ifeval_goals.instruction_table(report)
    assert ids == ["punctuation:no_comma"] and len(table) == 6
    path = tmp_path / "results.json"
    path.write_text(json.dumps(report))
    assert ifeval_goals.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| punctuation:no_comma (10) | 0.00 | 0.00 | 0.50 | 0.60 | 0.40 | 0.50 |" in out


def test_goals_judge_each_value_net_recipe():
    """A recipe variant (norm weight 0) is judged on its own: its row on its training base
    against the full FT, its row on another base as a cross-vocabulary row against its own
    base's, and against proxy-tuning on that base."""
    from ivl_local.eval import ifeval_goals

    def row(name, kind, base, value, ones):
        return {"name": name, "kind": kind, "base": base, "value": value, "alpha": 1.0,
                "scores": [1.0] * ones + [0.0] * (10 - ones)}

    value, value0 = "value[smollm2-135m, ifeval]", "value[smollm2-135m, norm 0, ifeval]"
    report = {"meta": {"split": "test"}, "results": [
        row("smollm2", "base", "smollm2-135m", "-", 0),
        row("gemma3", "base", "gemma3-270m", "-", 1),
        row("smollm2 + value", "in-distribution", "smollm2-135m", value, 1),
        row("smollm2 full-FT", "full-finetune", "smollm2-135m full-FT ifeval", "-", 8),
        row("gemma3 + value[smollm2]", "cross-vocab", "gemma3-270m", value, 0),
        row("gemma3 + proxy[smollm2]", "proxy-tuning", "gemma3-270m",
            "proxy[smollm2-135m full-FT ifeval - smollm2-135m]", 5),
        row("smollm2 + value norm 0", "norm-weight-0", "smollm2-135m", value0, 8),
        row("gemma3 + value[smollm2] norm 0", "norm-weight-0", "gemma3-270m", value0, 7)]}
    got = {g["goal"]: g for g in ifeval_goals.goals(report)}
    assert got["smollm2 + value: >= 90% of smollm2 full-FT's gain"]["verdict"] == "missed"
    own = got["smollm2 + value norm 0: >= 90% of smollm2 full-FT's gain"]
    assert own["value"] == pytest.approx(1.0) and own["verdict"] == "met"
    assert got["gemma3 + value[smollm2] norm 0: gain clearly above 0"]["verdict"] == "met"
    cross = got["gemma3 + value[smollm2] norm 0: >= 70% of the gain on its own base (smollm2 + value norm 0)"]
    assert cross["value"] == pytest.approx(6 / 8) and cross["verdict"] == "met"
    assert got["gemma3 + value[smollm2] norm 0 >= gemma3 + proxy[smollm2]"]["verdict"] == "met"
    assert got["gemma3 + value[smollm2] >= gemma3 + proxy[smollm2]"]["verdict"] == "missed"
    assert not any("norm 0: >= 70% of the gain on its own base (smollm2 + value)" in g for g in got)
    # the value net on its training model in another quantization is not a cross-vocabulary row,
    # and SmolLM2 -> Gemma alone is one direction, however many foreign bases it runs on
    report["results"] += [row("smollm2 Q4_0", "base", "smollm2-135m Q4_0", "-", 0),
                          row("smollm2 Q4_0 + value norm 0", "norm-weight-0", "smollm2-135m Q4_0", value0, 8),
                          row("qwen1.5b", "base", "qwen2.5-coder-1.5b", "-", 0),
                          row("qwen1.5b + value[smollm2]", "cross-vocab", "qwen2.5-coder-1.5b", value, 3)]
    got = {g["goal"]: g for g in ifeval_goals.goals(report)}
    assert not any(g.startswith("smollm2 Q4_0") for g in got)
    assert got["qwen1.5b + value[smollm2]: gain clearly above 0"]["verdict"] == "missed"
    assert got["across vocabularies in both directions"]["verdict"].startswith("not measured")
    report["results"] += [row("smollm2 + value[gemma3]", "cross-vocab", "smollm2-135m", "value[gemma3-270m, ifeval]", 2)]
    got = {g["goal"]: g for g in ifeval_goals.goals(report)}
    assert "across vocabularies in both directions" not in got
    # IVL >= proxy is met or missed only when the interval says so; level otherwise
    report["results"][5]["scores"] = [0.0] * 3 + [1.0] * 7   # as many wins as losses
    got = {g["goal"]: g for g in ifeval_goals.goals(report)}
    assert got["gemma3 + value[smollm2] norm 0 >= gemma3 + proxy[smollm2]"]["verdict"].startswith("level")


def test_goals_of_several_reports_on_the_same_items(tmp_path, capsys):
    """A row run later (the norm-0 net on Gemma) is judged with the earlier report's rows when
    both scored the same items; reports of other items, or one row with two different answer
    sets, are one error line."""
    from ivl_local.eval import ifeval_goals

    examples = load_split("test", 6, "ifeval")
    meta = {"task": "ifeval", "split": "test", "example_ids": [e.index for e in examples], "seed": 0,
            "max_tokens": 256}

    def row(name, kind, base, value, answers):
        return {"name": name, "kind": kind, "base": base, "value": value, "alpha": 1.0, "answers": answers,
                "scores": [float(e.verdict(a).prompt_strict) for e, a in zip(examples, answers)]}

    witness_of = {r["prompt"]: r["witness"] for r in rows("test")}
    good, bad = [witness_of[e.prompt] for e in examples], ["I do not know."] * len(examples)
    gemma = row("gemma3", "base", "gemma3-270m", "-", bad)
    first = {"meta": meta, "results": [gemma]}
    later = {"meta": meta, "results": [gemma, row("gemma3 + value[smollm2] norm 0", "cross-vocab", "gemma3-270m",
                                                  "value[smollm2-135m, norm 0, ifeval]", good)]}
    merged = ifeval_goals.merge_reports([first, later])
    assert [r["name"] for r in merged["results"]] == ["gemma3", "gemma3 + value[smollm2] norm 0"]
    got = {g["goal"]: g for g in ifeval_goals.goals(merged)}
    assert got["gemma3 + value[smollm2] norm 0: gain clearly above 0"]["verdict"] == "met"
    paths = []
    for i, report in enumerate([first, later, {"meta": {**meta, "example_ids": meta["example_ids"][::-1]},
                                               "results": [gemma]},
                                {"meta": meta, "results": [{**gemma, "answers": good}]}]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(report))
    assert ifeval_goals.main([str(paths[0]), str(paths[1])]) == 0
    assert "| gemma3 + value[smollm2] norm 0: gain clearly above 0 |" in capsys.readouterr().out
    png = tmp_path / "ifeval.png"
    assert ifeval_goals.main([str(paths[0]), str(paths[1]), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out
    assert ifeval_goals.main([str(paths[0]), "--plot"]) == 2
    assert "--plot needs a .png path" in capsys.readouterr().err
    assert ifeval_goals.main([str(paths[0]), str(paths[1]), "--plot", str(tmp_path / "no" / "x.png")]) == 2
    assert "--plot: no folder" in capsys.readouterr().err
    no_ids = tmp_path / "no-ids.json"
    no_ids.write_text(json.dumps({"meta": {**meta, "example_ids": None}, "results": [gemma]}))
    assert ifeval_goals.main([str(no_ids), "--plot", str(png)]) == 2
    assert "--plot needs a report with its example ids" in capsys.readouterr().err
    assert ifeval_goals.main([str(paths[0]), str(paths[2])]) == 2
    assert "differ in example_ids" in capsys.readouterr().err
    assert ifeval_goals.main([str(paths[0]), str(paths[3])]) == 2
    assert "two different rows are named 'gemma3'" in capsys.readouterr().err
    # rows that do not pair: no ids, another task, the same name with other scores (no answers)
    with pytest.raises(ValueError, match="no example ids"):
        ifeval_goals.merge_reports([first, {"meta": {**meta, "example_ids": []}, "results": []}])
    with pytest.raises(ValueError, match="differ in task"):
        ifeval_goals.merge_reports([{"meta": {**meta, "task": "ifeval"}, "results": []},
                                    {"meta": {**meta, "task": "spell"}, "results": []}])
    bare = {k: v for k, v in gemma.items() if k != "answers"}
    with pytest.raises(ValueError, match="two different rows"):
        ifeval_goals.merge_reports([{"meta": meta, "results": [bare]},
                                    {"meta": meta, "results": [{**bare, "scores": [1.0] * len(examples)}]}])
    with pytest.raises(ValueError, match="one name per report"):
        ifeval_goals.merge_reports([first, later], ["one"])
    other_task = tmp_path / "arith.json"
    other_task.write_text(json.dumps({"meta": {**meta, "task": "chain_sum"}, "results": [gemma]}))
    assert ifeval_goals.main([str(other_task)]) == 2
    assert "is a 'chain_sum' report, not an ifeval one" in capsys.readouterr().err


def test_instruction_level_gains_rescore_the_reports_answers():
    """Pooled instruction-level differences from the answers on the report's own prompts:
    witnesses pass every instruction, so witness - non-answer is 1 - the non-answer's rate."""
    from ivl_local.eval import ifeval_goals

    examples = load_split("test", 12, "ifeval")
    witness_of = {r["prompt"]: r["witness"] for r in rows("test")}
    good = [witness_of[e.prompt] for e in examples]
    bad = ["I do not know."] * len(examples)

    def row(name, kind, base, value, answers):
        return {"name": name, "kind": kind, "base": base, "value": value, "alpha": 1.0, "answers": answers}

    report = {"meta": {"split": "test", "example_ids": [e.index for e in examples]}, "results": [
        row("smollm2", "base", "smollm2-135m", "-", bad),
        row("smollm2 full-FT", "full-finetune", "smollm2-135m full-FT ifeval", "-", good),
        row("smollm2 + proxy", "proxy-tuning", "smollm2-135m", "proxy[smollm2-135m full-FT ifeval - smollm2-135m]", bad),
        row("smollm2 + value", "in-distribution", "smollm2-135m", "value[smollm2-135m, ifeval]", good)]}
    gains = {g["comparison"]: g for g in ifeval_goals.instruction_gains(report)}
    n = sum(len(e.instruction_ids) for e in examples)
    floor = summarize([e.verdict("I do not know.") for e in examples])["instruction_strict"]
    assert gains["smollm2 full-FT - smollm2"]["value"] == pytest.approx(1 - floor)
    assert gains["smollm2 + value - smollm2 + proxy"]["value"] == pytest.approx(1 - floor)
    assert gains["smollm2 + proxy - smollm2"]["value"] == 0 == gains["smollm2 + proxy - smollm2"]["ci"][0]
    lo, hi = gains["smollm2 + value - smollm2"]["ci"]
    assert lo <= 1 - floor <= hi and n > len(examples)


def test_an_answer_repeating_the_request_is_an_echo_and_fails_the_guarded_score():
    """The echo guard: a request sentence of >= 5 words repeated verbatim (case and spacing
    aside) marks the answer; IFEval's own strict verdicts are unchanged, the guarded one fails."""
    prompt = ("Describe a lighthouse. Include the keywords keeper and storm in the response. "
              "Your response must have 2 sections. Mark the beginning of each section with SECTION X.")
    ids, kwargs = ["keywords:existence"], [{"keywords": ["keeper", "storm"]}]
    echo = ("Include the keywords   KEEPER and storm in the response. SECTION 1 The keeper watched the storm.")
    own = "SECTION 1\nThe keeper climbs the stairs while the storm rolls in from the sea."
    assert ifeval.echoed(echo, prompt) == ("include the keywords keeper and storm in the response.",)
    assert ifeval.echoed(own, prompt) == () and ifeval.echoed(None, prompt) == ()
    assert ifeval.echoed("Describe a lighthouse. A tall tower.", prompt) == ()   # 3 words: not an echo
    v_echo, v_own = verify(echo, ids, kwargs, prompt), verify(own, ids, kwargs, prompt)
    assert v_echo.prompt_strict and v_echo.echo and not v_echo.prompt_strict_no_echo
    assert v_own.prompt_strict and not v_own.echo and v_own.prompt_strict_no_echo
    assert not verify(echo, ids, kwargs).echo   # no prompt given: no guard
    s = summarize([v_echo, v_own])
    assert (s["prompt_strict"], s["prompt_strict_no_echo"], s["echoes"]) == (1.0, 0.5, 0.5)


def test_echo_rows_rescore_the_reports_answers():
    """ifeval_goals.echo_rows: echoes and the guarded score per row, and the guarded gain over
    the base alone, from the report's answers (a base that only echoes scores 0 guarded)."""
    from ivl_local.eval import ifeval_goals

    examples = load_split("test", 10, "ifeval")
    witness_of = {r["prompt"]: r["witness"] for r in rows("test")}
    echo = [e.prompt + "\n" + witness_of[e.prompt] for e in examples]
    good = [witness_of[e.prompt] for e in examples]

    def row(name, kind, base, value, answers):
        return {"name": name, "kind": kind, "base": base, "value": value, "alpha": 1.0, "answers": answers,
                "scores": [float(e.verdict(a).prompt_strict) for e, a in zip(examples, answers)]}

    report = {"meta": {"split": "test", "example_ids": [e.index for e in examples]}, "results": [
        row("gemma3", "base", "gemma3-270m", "-", echo),
        row("gemma3 + value[smollm2]", "cross-vocab", "gemma3-270m", "value[smollm2-135m, ifeval]", good)]}
    out = {r["name"]: r for r in ifeval_goals.echo_rows(report)}
    base, fused = out["gemma3"], out["gemma3 + value[smollm2]"]
    assert base["echoes"] == 1.0 and base["prompt_strict_no_echo"] == 0.0 and base["gain"] is None
    assert fused["echoes"] == 0.0 and fused["prompt_strict_no_echo"] == fused["prompt_strict"] == 1.0
    assert fused["gain"]["value"] == pytest.approx(1.0) and fused["gain"]["vs"] == "gemma3"
    # the goals, judged again with echoes failing: the base's credit for echoing is gone
    strict_floor = float(np.mean([e.verdict(a).prompt_strict for e, a in zip(examples, echo)]))
    plain = {g["goal"]: g for g in ifeval_goals.goals(report)}["gemma3 + value[smollm2]: gain clearly above 0"]
    guarded = {g["goal"]: g for g in ifeval_goals.guarded_goals(report)}["gemma3 + value[smollm2]: gain clearly above 0"]
    assert plain["value"] == pytest.approx(1.0 - strict_floor) and strict_floor > 0   # echoes pass IFEval
    assert guarded["value"] == pytest.approx(1.0)
    assert guarded["verdict"] == "met"
    assert "The same goals with an answer that echoes the request failing" in ifeval_goals.markdown(report)


def test_first_runs_gemma_passes_were_all_echoes():
    """The committed first-run report, re-scored: Gemma 3 base echoed 18 of 40 requests and
    every prompt it passed was an echo (docs/results, ifeval section)."""
    from ivl_local.eval import ifeval_goals
    from ivl_local.eval.report import load_report

    report = load_report(Path(__file__).resolve().parents[1] / "docs/results/ifeval-first/results.json")
    out = {r["name"]: r for r in ifeval_goals.echo_rows(report)}
    assert (out["gemma3"]["echoes"], out["gemma3"]["prompt_strict"], out["gemma3"]["prompt_strict_no_echo"]) == \
        (18 / 40, 3 / 40, 0.0)
    assert "| gemma3 | 0.450 | 0.075 | 0.000 |" in ifeval_goals.markdown(report)


def test_the_default_chat_value_network_before_and_after_the_tasks_demonstrations(tmp_path):
    """The plan's chat-value rows: "before" is ivl-chat's default recipe on the chat set alone,
    "after" the same recipe on the chat set + this task's demonstrations (one epoch each); the
    workspace trains "after" on the concatenated sets, and the report gives after - before."""
    import math as _math

    import numpy as np

    from ivl_local.datasets import data_path
    from ivl_local.eval import build_plan
    from ivl_local.eval.artifacts import Workspace
    from ivl_local.eval.configs import EvalConfig, Trained
    from ivl_local.eval.harness import ConfigResult
    from ivl_local.eval.ifeval_plan import MAX_LEN, chat_value_rows
    from ivl_local.eval.report import comparisons
    from ivl_local.train.api import DEFAULT_RECIPE

    before, after = chat_value_rows()
    assert (before.kind, after.kind) == ("chat-value", "chat-value")
    b, a = before.value, after.value
    assert (b.base, b.init, b.data) == (DEFAULT_RECIPE["base"], DEFAULT_RECIPE["init"], ("chat",))
    assert b.steps == 41          # the default recipe's one epoch (docs: 41 steps)
    assert dict(b.extra)["max_len"] == DEFAULT_RECIPE["max_len"] and dict(a.extra)["max_len"] == MAX_LEN
    assert a.data == ("chat", "ifeval", "ifeval-sampled") and a.steps > b.steps
    assert {c.name for c in build_plan(task="ifeval", installed=lambda name: False).configs} >= {before.name, after.name}

    # the mix: every line of every set, once, in order; content-named; reused
    ws = Workspace(tmp_path, log=lambda line: None)
    mixed = ws.demonstrations(a)
    lines = mixed.read_text().splitlines()
    sets = [data_path(name) for name in ("chat_train.jsonl", "ifeval_train.jsonl", "ifeval_train_sampled.jsonl")]
    expected = [line for path in sets for line in path.read_text().splitlines()]
    assert lines == expected and len(lines) == 339 + 768 + len(sets[2].read_text().splitlines())
    assert ws.demonstrations(a) == mixed and ws.demonstrations(Trained("smollm2-135m", task="ifeval")).name == "ifeval_train.jsonl"
    # a recipe without a mix keeps its old cache key; a mix of unknown sets is refused
    assert "data" not in Trained("smollm2-135m").recipe() and a.recipe()["data"] == a.data
    with pytest.raises(ValueError, match="demonstration sets"):
        Trained("gemma3-270m", data=("chat", "nope"))
    with pytest.raises(ValueError, match="demonstration sets"):
        Trained("gemma3-270m", data=("chat", "chat"))

    # the report's after - before row, paired over the same items
    n = 10
    base_scores = np.zeros(n)
    rows_ = {"gemma3": ConfigResult(EvalConfig("gemma3", "base", "gemma3-270m"), [""] * n, base_scores, base_scores, 0.0),
             before.name: ConfigResult(before, [""] * n, np.array([1.0] * 2 + [0.0] * 8), base_scores, 0.0),
             after.name: ConfigResult(after, [""] * n, np.array([1.0] * 6 + [0.0] * 4), base_scores, 0.0)}
    found = [r for r in comparisons(rows_) if r["comparison"].startswith("after - before")]
    assert len(found) == 1 and "ifeval+ifeval-sampled" in found[0]["comparison"]
    assert _math.isclose(found[0]["value"], 0.4)
    # a run of the two rows alone (no base-alone row) still has it; only the gains need that row
    del rows_["gemma3"]
    rows = comparisons(rows_)
    assert [r["comparison"] for r in rows] == [found[0]["comparison"]]
