"""Evaluation harness: intervals against known values, the task scorer, the plan, and the
whole report pipeline with a fake workspace and fake runners; (real) the quick mode."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from ivl_local.eval import (KINDS, EvalConfig, Plan, Requantized, Trained, build_plan, run_eval,
                           wilson_interval)
from ivl_local.errors import DataError
from ivl_local.eval.configs import IFEVAL_KINDS, OPTIONAL_KINDS, AlignedMap, ProxyRef, alpha_sweep
from ivl_local.eval.report import comparisons
from ivl_local.eval.stats import bootstrap_interval, paired_difference, paired_ratio
from ivl_local.eval.task import load_split


# --- intervals ---------------------------------------------------------------------------

@pytest.mark.parametrize("k, n, lo, hi", [(0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0),
                                          (5, 10, 0.2366, 0.7634), (41, 60, 0.5577, 0.7869)])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_bootstrap_interval_constant_and_coverage():
    assert bootstrap_interval([0.5] * 20) == (0.5, 0.5)
    x = np.random.default_rng(1).random(400)
    lo, hi = bootstrap_interval(x)
    assert lo < x.mean() < hi and hi - lo < 0.1
    assert bootstrap_interval(x) == (lo, hi)   # seeded: reproducible


def test_paired_difference_and_ratio():
    a = np.array([1, 1, 1, 0, 1, 1, 0, 1.0])
    b = np.array([0, 1, 0, 0, 0, 1, 0, 0.0])
    d, lo, hi = paired_difference(a, b)
    assert d == pytest.approx(0.5) and lo <= d <= hi
    full = np.ones(8)
    r, rlo, rhi = paired_ratio(a, b, full, b)    # (0.75-0.25)/(1-0.25)
    assert r == pytest.approx(2 / 3) and rlo <= r <= rhi
    r0, _, _ = paired_ratio(a, b, b, b)           # zero denominator
    assert math.isnan(r0)
    with pytest.raises(ValueError):
        paired_difference(a, b[:3])


# --- task ----------------------------------------------------------------------------------

def test_task_scorer_is_reasoning_gyms():
    [ex] = load_split("test", limit=1)
    assert ex.prompt_messages[-1]["role"] == "user" and ex.answer == ex.messages[-1]["content"]
    assert ex.score(ex.answer) == 1.0
    assert ex.score(f"  {ex.answer}\n") == 1.0
    sentence = f"The answer is {ex.answer}."
    assert 0 < ex.score(sentence) < 1                    # partial credit: oracle inside the text
    assert ex.lenient_score(sentence) == 1.0
    assert ex.score("") == 0.0 and ex.lenient_score("no number") == 0.0


# --- plan ------------------------------------------------------------------------------------

@pytest.mark.parametrize("quick", [True, False])
def test_plan_has_every_kind_and_unique_names(quick):
    plan = build_plan(quick, installed=lambda name: name in ("smollm2-135m", "gemma3-270m"))
    kinds = {c.kind for c in plan.configs}
    assert kinds == set(KINDS) - set(OPTIONAL_KINDS) - set(IFEVAL_KINDS)
    names = [c.name for c in plan.configs]
    assert len(names) == len(set(names))
    assert any("qwen" in s for s in plan.skipped)
    sweep = [c.alpha for c in plan.configs if c.kind == "alpha-sweep"]
    assert 0.0 in sweep and 1.5 in sweep


def test_plan_with_qwen_installed_adds_same_family():
    plan = build_plan(False, installed=lambda name: True)
    same = [c for c in plan.configs if c.kind == "same-family"]
    assert len(same) == 1 and same[0].base == "qwen2.5-coder-1.5b"
    assert same[0].value.base == "qwen2.5-coder-0.5b" and same[0].value.init == "pretrained"
    [ref] = [c for c in plan.configs if c.kind == "full-finetune" and c.base.base == "qwen2.5-coder-1.5b"]
    assert dict(ref.base.extra)["train_layers"] > 0 and ref.base.steps == same[0].value.steps


# --- the pipeline with fakes -------------------------------------------------------------

class FakeWorkspace:
    """Paths that do not exist; nothing is built."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.built = []

    def model(self, ref):
        self.built.append(ref)
        name = ref if isinstance(ref, str) else ref.label
        return self.tmp / (name.replace(" ", "_") + ".gguf")

    def token_map(self, spec):
        return self.tmp / "aligned.npz"

    def describe(self, path):
        return {"file": str(path), "sha256": "0123456789ab"}


def make_fake_runner(table, created=None):
    """table: base file stem -> (value-less accuracy, with-value accuracy at alpha 1)."""
    created = [] if created is None else created

    class FakeRunner:
        def __init__(self, base, value, token_map, seed, torch_gguf, value_prompt="own", terms=(), map_mode="raw"):
            self.base, self.value, self.alpha, self.closed = Path(base).stem, value, 1.0, False
            self.terms, self.map_mode = list(terms), map_mode
            created.append(self)

        def answer_all(self, conversations, max_tokens, advance=lambda: None):
            alone, with_value = table[self.base]
            if self.map_mode != "raw":   # e.g. the "candidates" entry: its with-value accuracy
                with_value = table[self.map_mode][1]
            p = alone if self.value is None else alone + (with_value - alone) * min(self.alpha, 1.0)
            # a proxy term: the "proxy" entry's accuracy; each extra value net: "extra" points
            if any(type(t).__name__ == "Proxy" for t in self.terms):
                p = table.get("proxy", (0.0, alone))[1]
            p -= table.get("extra", (0.0, 0.0))[1] * sum(type(t).__name__ == "ValueNet" for t in self.terms)
            out = []
            for i, messages in enumerate(conversations):
                answer = FAKE_ANSWERS[i] if (i % 10) < round(p * 10) else "I do not know"
                out.append(answer)
                advance()
            return out

        def close(self):
            self.closed = True

    return FakeRunner


FAKE_ANSWERS = [e.answer for e in load_split("test", limit=40)]


def fake_configs():
    v = Trained("smollm2-135m", init="fresh")
    ft = Trained("smollm2-135m", full_finetune=True)
    q8 = Requantized("smollm2-135m", "Q8_0")
    cross = EvalConfig("gemma3 + value", "cross-vocab", "gemma3-270m", v)
    return [EvalConfig("smol", "base", "smollm2-135m"), EvalConfig("gemma", "base", "gemma3-270m"),
            EvalConfig("q8", "base", q8),
            EvalConfig("smol + value", "in-distribution", "smollm2-135m", v),
            EvalConfig("smol FT", "full-finetune", ft),
            EvalConfig("q8 + value", "other-quantization", q8, v), cross,
            EvalConfig("gemma3 + value aligned", "cross-vocab-aligned", "gemma3-270m", v,
                       token_map=AlignedMap("gemma3-270m", v)),
            EvalConfig("smol + value norm 0", "norm-weight-0", "smollm2-135m", replace(v, norm_weight=0.0)),
            cross.with_(name="gemma3 + value base format", value_prompt="base"),
            *alpha_sweep(cross, (0.0, 0.5))]


def test_run_eval_with_fakes_writes_a_complete_report(tmp_path):
    table = {"smollm2-135m": (0.2, 0.8), "gemma3-270m": (0.1, 0.5), "smollm2-135m_Q8_0": (0.2, 0.7),
             "smollm2-135m_full-FT": (0.9, 0.9)}
    logs = []
    report = run_eval(Plan(fake_configs(), ["qwen: not installed"]), limit=40, quick=True, out_dir=tmp_path,
                      workspace=FakeWorkspace(tmp_path), runner_factory=make_fake_runner(table),
                      command="pytest fake", log=logs.append, progress=False)
    names = [c.name for c in fake_configs()]
    assert list(report.results) == names
    out = tmp_path / "quick"
    assert report.out_dir == out
    for r in report.results.values():
        assert r.n == 40 and 0 <= r.score <= 1
        lo, hi = r.score_ci
        assert 0 <= lo <= r.score <= hi <= 1
    assert report.results["smol"].score == pytest.approx(0.2)
    assert report.results["smol + value"].score == pytest.approx(0.8)
    assert report.results["gemma3 + value @a=0"].score == pytest.approx(0.1)

    rows = {row["comparison"]: row for row in comparisons(report.results)}
    recovery = rows["share of full-FT gain recovered: smol + value"]
    assert recovery["value"] == pytest.approx((0.8 - 0.2) / (0.9 - 0.2)) and recovery["met"] is False
    assert rows["full-FT gain: smol FT vs smol"]["ci"][0] > 0
    kept = rows["share of in-distribution gain kept: q8 + value"]
    assert kept["value"] == pytest.approx((0.7 - 0.2) / (0.8 - 0.2)) and kept["met"] is False
    assert rows["gain: gemma3 + value vs gemma"]["met"] is True
    assert rows["aligned - exact-text map: gemma3 + value aligned"]["value"] == pytest.approx(0.0)
    assert rows["value's own chat format - base's format: gemma3 + value"]["value"] == pytest.approx(0.0)
    assert rows["alpha 0 reproduces base alone: gemma3 + value @a=0"]["met"] is True
    assert rows["norm penalty (weight 1 - weight 0): smol + value"]["value"] == pytest.approx(0.0)

    md = (out / "results.md").read_text()
    for name in names:
        assert f"| {name} |" in md
    for text in ("pytest fake", "0123456789ab", "qwen: not installed", "Alpha sweeps", "scores.png", "alpha.png"):
        assert text in md
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["results"]] == names and data["meta"]["examples"] == 40
    for png in ("scores.png", "alpha.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_share_of_an_insignificant_gain_is_undecided():
    from ivl_local.eval.harness import ConfigResult

    v = Trained("smollm2-135m")
    ft = Trained("smollm2-135m", full_finetune=True)
    zeros, one = np.zeros(20), np.zeros(20)
    one[0] = 1.0      # full FT "gains" one example of 20: its CI includes 0
    results = {name: ConfigResult(EvalConfig(name, kind, base, value), [""] * 20, scores, scores, 0.0)
               for name, kind, base, value, scores in [
                   ("smol", "base", "smollm2-135m", None, zeros),
                   ("smol + value", "in-distribution", "smollm2-135m", v, one),
                   ("smol FT", "full-finetune", ft, None, one)]}
    [row] = [r for r in comparisons(results) if r["comparison"].startswith("share")]
    assert row["value"] == pytest.approx(1.0) and row["met"] is None


def test_same_family_rows_compare_with_the_training_base_and_the_reference():
    from ivl_local.eval.harness import ConfigResult

    v = Trained("qwen2.5-coder-0.5b", init="pretrained")
    ref = Trained("qwen2.5-coder-1.5b", full_finetune=True, extra=(("train_layers", 4),))
    n = 40

    def scores(k):          # the first k of n examples right
        out = np.zeros(n)
        out[:k] = 1.0
        return out

    results = {name: ConfigResult(EvalConfig(name, kind, base, value), [""] * n, scores(k), scores(k), 0.0)
               for name, kind, base, value, k in [
                   ("q0.5", "base", "qwen2.5-coder-0.5b", None, 4),
                   ("q1.5", "base", "qwen2.5-coder-1.5b", None, 10),
                   ("q0.5 + value", "in-distribution", "qwen2.5-coder-0.5b", v, 20),
                   ("q1.5 + value", "same-family", "qwen2.5-coder-1.5b", v, 30),
                   ("q1.5 partial-FT", "full-finetune", ref, None, 35)]}
    rows = {r["comparison"]: r for r in comparisons(results)}
    more = rows["gain on q1.5 - gain on q0.5: q1.5 + value"]
    assert more["value"] == pytest.approx((30 - 10) / n - (20 - 4) / n) and more["met"] is True
    assert rows["reference gain: q1.5 partial-FT vs q1.5"]["value"] == pytest.approx(25 / n)
    share = rows["share of q1.5 partial-FT gain recovered: q1.5 + value"]
    assert share["value"] == pytest.approx(20 / 25) and share["met"] is True
    assert Trained("qwen2.5-coder-1.5b", full_finetune=True, extra=(("train_layers", 4),)).label.endswith("partial-FT")


def test_run_eval_skips_a_missing_model_with_a_notice(tmp_path):
    from ivl_local.errors import ModelNotFoundError

    class Missing(FakeWorkspace):
        def model(self, ref):
            if ref == "qwen2.5-coder-1.5b":
                raise ModelNotFoundError("model 'qwen2.5-coder-1.5b' is not installed")
            return super().model(ref)

    configs = [EvalConfig("smol", "base", "smollm2-135m"), EvalConfig("qwen", "base", "qwen2.5-coder-1.5b")]
    logs = []
    report = run_eval(configs, limit=5, out_dir=tmp_path, workspace=Missing(tmp_path),
                      runner_factory=make_fake_runner({"smollm2-135m": (0.0, 0.0)}), log=logs.append,
                      progress=False)
    assert list(report.results) == ["smol"]
    assert any("qwen" in line and "not installed" in line for line in logs)
    assert "not installed" in (tmp_path / "results.md").read_text()


def test_duplicate_names_are_refused(tmp_path):
    c = EvalConfig("same", "base", "smollm2-135m")
    with pytest.raises(ValueError):
        run_eval([c, c], limit=1, out_dir=tmp_path, workspace=FakeWorkspace(tmp_path),
                 runner_factory=make_fake_runner({}), progress=False)


# --- the real quick mode -------------------------------------------------------------------

@pytest.mark.real
@pytest.mark.slow
@pytest.mark.train
def test_quick_mode_real(tmp_path, smollm2_path, gemma3_path):
    """The real quick plan: trains its small artifacts on first use (cached afterwards under
    ivl_local.models.cache_dir()/eval), then answers a few test examples per configuration."""
    report = run_eval(None, quick=True, limit=6, out_dir=tmp_path, progress=False)
    plan = build_plan(quick=True)
    assert list(report.results) == [c.name for c in plan.configs], report.skipped
    assert {r.config.kind for r in report.results.values()} == set(KINDS) - set(OPTIONAL_KINDS) - set(IFEVAL_KINDS)
    for r in report.results.values():
        assert r.n == report.meta["examples"] > 0
        assert all(0.0 <= s <= 1.0 for s in r.scores) and all(0.0 <= s <= 1.0 for s in r.lenient)
    rows = comparisons(report.results)
    assert all(row["met"] for row in rows if row["kind"] == "check"), rows   # alpha 0 == base alone
    md = (tmp_path / "quick" / "results.md").read_text()
    assert all(f"| {name} |" in md for name in report.results)
    assert (tmp_path / "quick" / "scores.png").exists() and (tmp_path / "quick" / "alpha.png").exists()


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.train
def test_torch_runner_matches_the_engine_on_a_full_finetune(smollm2_path):
    """The torch path (for full fine-tunes llama.cpp cannot load) renders, tokenizes and
    decodes like the Engine: same greedy answers from the same weights (the quick plan's
    SmolLM2 full fine-tune, fp32 in torch vs q8_0 GGUF)."""
    from ivl_local.eval.artifacts import Workspace
    from ivl_local.eval.runners import EngineRunner, TorchRunner
    from ivl_local.models import cache_dir

    [ft_config] = [c for c in build_plan(quick=True).configs if c.kind == "full-finetune"]
    ws = Workspace(cache_dir() / "eval")
    gguf = ws.model(ft_config.base)
    checkpoint = gguf.parent / "checkpoint"
    conversations = [e.prompt_messages for e in load_split("test", limit=4)]
    torch_answers = TorchRunner(checkpoint, smollm2_path, threads=1).answer_all(conversations, 12)
    engine = EngineRunner(gguf, None, None, seed=0, threads=1)
    try:
        engine_answers = engine.answer_all(conversations, 12)
    finally:
        engine.close()
    same = sum(a == b for a, b in zip(torch_answers, engine_answers))
    assert same >= 3, (torch_answers, engine_answers)


@pytest.mark.real
def test_the_engine_runner_answers_each_example_from_an_empty_cache(smollm2_path):
    """An example's answer must not depend on the examples before it (a subset or a longer run
    of the same split gives the same answer): no prompt token comes from the previous one."""
    from ivl_local.eval.runners import EngineRunner

    conversations = [e.prompt_messages for e in load_split("test", limit=3)]
    runner = EngineRunner(smollm2_path, None, None, seed=0, threads=1)
    try:
        reused = []
        for messages in conversations:
            runner.answer_all([messages, messages], 4)      # the same prompt twice in a row
            reused.append(runner.engine.stats.reused_prompt_tokens)
        alone = runner.answer_all(conversations[2:], 8)
        after = runner.answer_all(conversations, 8)
    finally:
        runner.close()
    assert reused == [0, 0, 0]
    assert after[2] == alone[0]


def test_a_second_run_waits_for_the_artifact_lock(tmp_path):
    import threading

    from ivl_local.eval.artifacts import _exclusive

    lock, order = tmp_path / ".lock", []

    def second():
        with _exclusive(lock, on_wait=lambda: order.append("wait")):
            order.append("second")

    with _exclusive(lock):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)              # blocked: the first holder has the lock
        order.append("first done")
    thread.join(10)
    assert order == ["wait", "first done", "second"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_job_dies_with_the_evaluation_that_started_it(tmp_path):
    """A killed evaluation must not leave its training job running (unlocked, so the next
    evaluation of the recipe would train into the same folder at the same time)."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    parent = (
        "import functools, os, subprocess, sys, time\n"
        "from ivl_local.eval.artifacts import _child_setup, _linux_prctl\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                         preexec_fn=functools.partial(_child_setup, os.getpid(), _linux_prctl()))\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(child, 0)                       # running while its parent lives
    proc.send_signal(signal.SIGKILL)        # the parent is killed (not Ctrl-C: no process group signal)
    proc.wait()
    deadline = time.monotonic() + 30
    while True:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break                           # gone (reaped by init)
        # a zombie waiting for init to reap it is dead too
        status = Path(f"/proc/{child}/stat").read_text().split(") ")[-1].split()[0] if \
            Path(f"/proc/{child}/stat").exists() else "X"
        if status in ("Z", "X"):
            break
        assert time.monotonic() < deadline, "the job outlived the evaluation that started it"
        time.sleep(0.05)


def test_paired_script_compares_two_reports_on_the_same_items(tmp_path):
    import subprocess
    import sys

    def report(path, name, scores, ids):
        meta = {"split": "test", "example_ids": ids, "seed": 0, "max_tokens": 16}
        path.write_text(json.dumps({"meta": meta, "results": [{"name": name, "scores": scores}]}))
        return str(path)

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "paired.py"
    a = report(tmp_path / "a.json", "x", [1.0, 1.0, 0.0, 1.0], [1, 2, 3, 4])
    b = report(tmp_path / "b.json", "y", [0.0, 1.0, 0.0, 0.0], [1, 2, 3, 4])
    out = subprocess.run([sys.executable, str(script), a, "x", b, "y"], capture_output=True, text=True)
    assert out.returncode == 0 and "+0.500" in out.stdout, out.stderr
    other = report(tmp_path / "c.json", "y", [0.0, 1.0, 0.0, 0.0], [1, 2, 3, 5])
    out = subprocess.run([sys.executable, str(script), a, "x", other, "y"], capture_output=True, text=True)
    assert out.returncode != 0 and "differ in example_ids" in out.stderr
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "absent.json"), "x", b, "y"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        f"error: no such report: {tmp_path / 'absent.json'} (benchmarks/eval.py writes results.json)"]


def test_map_kind_names_the_identity_map_for_a_shared_vocabulary():
    from ivl_local.eval.harness import ConfigResult

    v = Trained("qwen2.5-coder-0.5b")
    scores = np.zeros(2)

    def result(config, base_vocab, value_vocab):
        files = {"base": {"vocab": base_vocab}, "value": {"vocab": value_vocab}}
        return ConfigResult(config, ["", ""], scores, scores, 0.0, files)

    same = EvalConfig("q", "same-family", "qwen2.5-coder-1.5b", v)
    assert result(same, "abc", "abc").map_kind == "identity"
    assert result(same, "abc", "xyz").map_kind == "exact-text"
    assert result(same, None, None).map_kind == "exact-text"      # unknown: the default map
    aligned = same.with_(token_map=AlignedMap("qwen2.5-coder-1.5b", v))
    assert result(aligned, "abc", "xyz").map_kind == "aligned"
    assert result(EvalConfig("b", "base", "qwen2.5-coder-1.5b"), "abc", None).map_kind == "-"


@pytest.mark.real
def test_vocab_of_tells_the_real_vocabularies_apart(smollm2_path, gemma3_path, tmp_path):
    from ivl_local.eval.artifacts import vocab_of

    smol, gemma = vocab_of(smollm2_path), vocab_of(gemma3_path)
    assert smol and gemma and smol != gemma and vocab_of(smollm2_path) == smol
    (tmp_path / "m.npz").write_bytes(b"PK")
    assert vocab_of(tmp_path / "m.npz") is None


# --- alpha chosen on the validation split -------------------------------------------------

def sweep_report(split: str, scores: dict[float, float], name: str = "smol + value") -> dict:
    results = [{"name": name if a == 1.0 else f"{name} @a={a:g}", "alpha": a, "score": s}
               for a, s in scores.items()]
    results.append({"name": "smol", "alpha": 1.0, "score": 0.01})   # not swept: no choice
    return {"meta": {"split": split, "examples": 300}, "results": results}


def test_best_alpha_is_the_highest_score_and_ties_go_to_the_default():
    from ivl_local.eval.alpha_select import best_alphas

    got = best_alphas(sweep_report("valid", {0.5: 0.10, 1.0: 0.18, 1.25: 0.21, 1.5: 0.19}))
    assert list(got) == ["smol + value"]
    choice = got["smol + value"]
    assert choice.alpha == 1.25 and choice.score == pytest.approx(0.21)
    assert "alpha 1.25 chosen on split 'valid' (300 examples; 0.5: 0.100, 1: 0.180, 1.25: 0.210" in choice.note()
    tie = best_alphas(sweep_report("valid", {0.75: 0.2, 1.0: 0.2, 1.5: 0.2}))["smol + value"]
    assert tie.alpha == 1.0
    assert best_alphas(sweep_report("valid", {0.5: 0.3, 1.0: 0.2, 1.5: 0.3}))["smol + value"].alpha == 0.5


def test_applied_alpha_keeps_name_and_kind_and_refuses_the_evaluated_split():
    from ivl_local.errors import ConfigError
    from ivl_local.eval.alpha_select import apply_alphas, best_alphas

    plan = Plan(fake_configs())
    choices = best_alphas(sweep_report("valid", {1.0: 0.18, 1.25: 0.21}))
    new = apply_alphas(plan, choices, report_split="valid", eval_split="test")
    by = {c.name: c for c in new.configs}
    assert by["smol + value"].alpha == 1.25 and by["smol + value"].kind == "in-distribution"
    assert "chosen on split 'valid'" in by["smol + value"].note
    assert [c for c in new.configs if c.name != "smol + value"] == [c for c in plan.configs if c.name != "smol + value"]
    with pytest.raises(ConfigError, match="tuning|the split being evaluated"):
        apply_alphas(plan, choices, report_split="test", eval_split="test")
    with pytest.raises(ConfigError, match="no alpha sweep"):
        apply_alphas(plan, {}, report_split="valid", eval_split="test")


def test_alpha_report_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    from ivl_local.errors import ConfigError
    from ivl_local.eval.report import load_report

    with pytest.raises(ConfigError, match="no such report"):
        load_report(tmp_path / "absent.json")
    (tmp_path / "foreign.json").write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="not an evaluation report"):
        load_report(tmp_path / "foreign.json")
    on_test = tmp_path / "test-sweep.json"
    on_test.write_text(json.dumps(sweep_report("test", {1.0: 0.18, 1.25: 0.21}, name="smollm2 + value")))
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "eval.py"), "--alpha-from", str(on_test),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: the alphas were chosen on split 'test', the split being evaluated; "
        "choose them on another split (benchmarks/eval.py --split valid)"]
    assert not (tmp_path / "out").exists()


def test_notes_are_in_the_markdown_report(tmp_path):
    configs = [EvalConfig("smol", "base", "smollm2-135m"),
               EvalConfig("smol + value", "in-distribution", "smollm2-135m", Trained("smollm2-135m", init="fresh"),
                          alpha=1.25, note="alpha 1.25 chosen on split 'valid'")]
    run_eval(Plan(configs), limit=10, quick=True, out_dir=tmp_path, workspace=FakeWorkspace(tmp_path),
             runner_factory=make_fake_runner({"smollm2-135m": (0.2, 0.8)}), command="pytest fake",
             log=lambda _: None, progress=False)
    md = (tmp_path / "quick" / "results.md").read_text()
    assert "## Notes" in md and "- smol + value: alpha 1.25 chosen on split 'valid'" in md


# --- proxy-tuning and composed value nets ----------------------------------------------------

def test_plans_hold_proxy_tuning_and_composition_on_both_tasks():
    only_small = lambda name: name in ("smollm2-135m", "gemma3-270m")   # noqa: E731
    main = {c.name: c for c in build_plan(False, installed=only_small).configs}
    proxy = main["smollm2 + proxy"].proxy
    assert proxy.expert.full_finetune and proxy.expert.base == proxy.anti == "smollm2-135m"
    assert main["gemma3 + proxy[smollm2]"].proxy == proxy and main["gemma3 + proxy[smollm2]"].value is None
    composed = main["smollm2 + value + value[spell]"]
    assert composed.value == main["smollm2 + value"].value
    [(other, weight)] = composed.extra_values
    assert other.task == "spell" and weight == 1.0 and other == main["smollm2 + value[spell]"].value
    spell = {c.name: c for c in build_plan(False, installed=only_small, task="spell").configs}
    assert spell["smollm2 + value + value[spell]"] == composed          # the same row on both tasks
    assert spell["smollm2 + value[spell]"].kind == "in-distribution"
    assert spell["smollm2 + value"].kind == "other-task"
    with_qwen = {c.name: c for c in build_plan(False, installed=lambda name: True).configs}
    assert with_qwen["qwen1.5b + proxy[smollm2]"].proxy == proxy
    large_only = {c.name for c in build_plan(False, installed=lambda name: name != "qwen2.5-coder-0.5b").configs}
    assert {"qwen1.5b", "qwen1.5b + proxy[smollm2]", "qwen1.5b + value[smollm2]"} <= large_only
    assert "qwen1.5b + value[qwen0.5b]" not in large_only
    with pytest.raises(ValueError, match="unknown task"):
        build_plan(task="poetry")


def test_the_main_task_keeps_the_cache_keys_of_older_artifacts():
    """Trained gained task and data fields; the artifacts trained before them keep their recipe hash."""
    v = Trained("smollm2-135m", init="pretrained", steps=100)
    old = {k: val for k, val in asdict(v).items() if k not in ("task", "data")}
    assert v.recipe() == old
    assert replace(v, task="spell").recipe()["task"] == "spell"
    assert replace(v, task="spell").label == "value[smollm2-135m, spell]"


def test_the_second_task_loads_and_scores_words():
    [ex] = load_split("test", limit=1, task="spell")
    assert ex.task == "spell_backward" and ex.answer.isalpha()
    assert ex.score(ex.answer) == 1.0 and ex.score("no") < 1.0
    assert ex.lenient_score(f"{ex.answer}, of course") == 1.0     # first word, not first number
    with pytest.raises(DataError, match="unknown task"):
        load_split("test", task="poetry")


def test_proxy_and_composed_rows_are_paired_with_ivl_and_each_value_net(tmp_path):
    v = Trained("smollm2-135m")
    v2 = replace(v, task="spell")
    ft = Trained("smollm2-135m", full_finetune=True)
    proxy = ProxyRef(ft, "smollm2-135m")
    configs = [EvalConfig("smol", "base", "smollm2-135m"), EvalConfig("gemma", "base", "gemma3-270m"),
               EvalConfig("smol + value", "in-distribution", "smollm2-135m", v),
               EvalConfig("smol FT", "full-finetune", ft),
               EvalConfig("smol + proxy", "proxy-tuning", "smollm2-135m", proxy=proxy),
               EvalConfig("gemma + value", "cross-vocab", "gemma3-270m", v),
               EvalConfig("gemma + proxy", "proxy-tuning", "gemma3-270m", proxy=proxy),
               EvalConfig("gemma + value norm 0", "cross-vocab", "gemma3-270m", replace(v, norm_weight=0.0)),
               EvalConfig("smol + value[spell]", "other-task", "smollm2-135m", v2),
               EvalConfig("smol + both", "composed", "smollm2-135m", v, extra_values=((v2, 1.0),))]
    table = {"smollm2-135m": (0.2, 0.8), "gemma3-270m": (0.1, 0.5), "smollm2-135m_full-FT": (0.9, 0.9),
             "proxy": (0.0, 0.6), "extra": (0.0, 0.1)}
    runners = []
    report = run_eval(Plan(configs), limit=40, out_dir=tmp_path, workspace=FakeWorkspace(tmp_path),
                      runner_factory=make_fake_runner(table, runners), command="pytest fake",
                      log=lambda line: None, progress=False)
    terms = {r.base + " " + str(r.value): r.terms for r in runners}
    [proxy_term] = terms["smollm2-135m None"]
    assert type(proxy_term).__name__ == "Proxy" and proxy_term.weight == 1.0
    assert proxy_term.expert.endswith("smollm2-135m_full-FT.gguf") and proxy_term.anti_expert.endswith(
        "smollm2-135m.gguf")
    [extra] = [t for key, t in terms.items() if key.startswith("smollm2-135m") and t and key != "smollm2-135m None"]
    assert type(extra[0]).__name__ == "ValueNet" and extra[0].model.endswith("spell].gguf")

    rows = {row["comparison"]: row for row in comparisons(report.results)}
    assert rows["IVL - proxy-tuning: smol + value vs smol + proxy"]["value"] == pytest.approx(0.8 - 0.6)
    assert rows["IVL - proxy-tuning: gemma + value vs gemma + proxy"]["value"] == pytest.approx(0.5 - 0.6)
    # every recipe of the value net is set against proxy-tuning; another task's net is not
    assert rows["IVL - proxy-tuning: gemma + value norm 0 vs gemma + proxy"]["value"] == pytest.approx(0.5 - 0.6)
    assert sum(row["comparison"].startswith("IVL - proxy-tuning") for row in comparisons(report.results)) == 3
    # a norm-0 twin that has its row's kind is still set against weight 1
    assert rows["norm penalty (weight 1 - weight 0): gemma + value"]["value"] == pytest.approx(0.0)
    assert rows["gain: gemma + proxy vs gemma"]["value"] == pytest.approx(0.6 - 0.1)
    share = rows["share of full-FT gain recovered: smol + proxy"]
    assert share["value"] == pytest.approx((0.6 - 0.2) / (0.9 - 0.2))
    assert "share of full-FT gain recovered: gemma + proxy" not in rows   # not the expert's base
    assert rows["composed - one value net: smol + both vs smol + value"]["value"] == pytest.approx(-0.1)
    assert rows["composed - one value net: smol + both vs smol + value[spell]"]["value"] == pytest.approx(-0.1)
    md = (tmp_path / "results.md").read_text()
    assert "proxy[smollm2-135m full-FT - smollm2-135m]" in md
    assert "value[smollm2-135m] + value[smollm2-135m, spell]" in md
    files = report.results["smol + proxy"].files
    assert set(files) == {"base", "expert", "anti-expert"}


def test_candidate_rows_load_their_own_engine_and_are_paired_with_the_raw_map(tmp_path):
    """The cross-vocabulary rows of issue 15: each keeps a share of the value net's own-base gain
    (goal 90 %), and a map_mode "candidates" row gets its own runner and its difference from the
    raw exact-text row on the same items."""
    from ivl_local.eval.configs import with_candidates

    v = Trained("smollm2-135m")
    cross = EvalConfig("gemma + value", "cross-vocab", "gemma3-270m", v)
    cand = with_candidates(cross)
    assert cand.name == "gemma + value candidates" and cand.map_mode == "candidates"
    assert cand.kind == "cross-vocab-candidates" and cand.engine_key != cross.engine_key
    configs = [EvalConfig("smol", "base", "smollm2-135m"), EvalConfig("gemma", "base", "gemma3-270m"),
               EvalConfig("smol + value", "in-distribution", "smollm2-135m", v), cross, cand]
    table = {"smollm2-135m": (0.2, 0.8), "gemma3-270m": (0.1, 0.5), "candidates": (0.0, 0.7)}
    runners = []
    report = run_eval(Plan(configs), limit=40, out_dir=tmp_path, workspace=FakeWorkspace(tmp_path),
                      runner_factory=make_fake_runner(table, runners), command="pytest fake",
                      log=lambda line: None, progress=False)
    assert sorted(r.map_mode for r in runners if r.base == "gemma3-270m" and r.value) == ["candidates", "raw"]
    rows = {row["comparison"]: row for row in comparisons(report.results)}
    raw_share = rows["share of own-base gain kept: gemma + value vs smol + value"]
    assert raw_share["value"] == pytest.approx((0.5 - 0.1) / (0.8 - 0.2)) and raw_share["met"] is False
    cand_share = rows["share of own-base gain kept: gemma + value candidates vs smol + value"]
    assert cand_share["value"] == pytest.approx((0.7 - 0.1) / (0.8 - 0.2)) and cand_share["met"] is True
    assert rows["candidates - raw map: gemma + value candidates"]["value"] == pytest.approx(0.7 - 0.5)
    summary = report.results["gemma + value candidates"].summary()
    assert summary["map_mode"] == "candidates" and summary["token_map"] == "exact-text + candidates"
    assert report.results["gemma + value"].summary()["map_mode"] == "raw"


def test_projection_rows_are_paired_with_the_raw_map_on_either_map(tmp_path):
    """map_mode logprob/shared twins (issue 15): their own engines, a share of the own-base
    gain each, and their difference from the raw row with the same token map (the exact-text
    map, and the corpus-aligned one)."""
    from ivl_local.eval.configs import AlignedMap, with_map_mode, with_projections

    v = Trained("smollm2-135m")
    cross = EvalConfig("gemma + value", "cross-vocab", "gemma3-270m", v)
    aligned = EvalConfig("gemma + value aligned", "cross-vocab-aligned", "gemma3-270m", v,
                         token_map=AlignedMap("gemma3-270m", v))
    logprob, shared = with_projections(cross)
    aligned_shared = with_map_mode(aligned, "shared")
    assert (logprob.name, shared.name, aligned_shared.name) == (
        "gemma + value logprob", "gemma + value shared", "gemma + value aligned shared")
    assert {c.kind for c in (logprob, shared, aligned_shared)} == {"cross-vocab-projection"}
    assert len({c.engine_key for c in (cross, logprob, shared, aligned, aligned_shared)}) == 5
    configs = [EvalConfig("smol", "base", "smollm2-135m"), EvalConfig("gemma", "base", "gemma3-270m"),
               EvalConfig("smol + value", "in-distribution", "smollm2-135m", v), cross, logprob, shared]
    table = {"smollm2-135m": (0.2, 0.8), "gemma3-270m": (0.1, 0.5), "logprob": (0.0, 0.5), "shared": (0.0, 0.3)}
    runners = []
    report = run_eval(Plan(configs), limit=40, out_dir=tmp_path, workspace=FakeWorkspace(tmp_path),
                      runner_factory=make_fake_runner(table, runners), command="pytest fake",
                      log=lambda line: None, progress=False)
    assert sorted(r.map_mode for r in runners if r.base == "gemma3-270m" and r.value) == ["logprob", "raw", "shared"]
    rows = {row["comparison"]: row for row in comparisons(report.results)}
    assert rows["logprob - raw map: gemma + value logprob"]["value"] == pytest.approx(0.0)
    assert rows["shared - raw map: gemma + value shared"]["value"] == pytest.approx(0.3 - 0.5)
    share = rows["share of own-base gain kept: gemma + value shared vs smol + value"]
    assert share["value"] == pytest.approx((0.3 - 0.1) / (0.8 - 0.2)) and share["met"] is False
    assert report.results["gemma + value shared"].summary()["token_map"] == "exact-text + shared"


def test_plans_hold_candidate_rows_for_every_cross_vocabulary_value_net():
    """Issue 15's projections on both tasks: each raw cross-vocabulary row of the SmolLM2 (and,
    when installed, Qwen) value nets has a candidates twin, and the spell task has its own."""
    for task in ("arith", "spell"):
        configs = {c.name: c for c in build_plan(False, installed=lambda name: True, task=task).configs}
        raw = [c for c in configs.values() if c.kind == "cross-vocab" and c.value_prompt == "own"
               and not c.name.startswith("smollm2 + value[")]
        assert raw, task
        for c in raw:
            twin = configs[c.name + " candidates"]
            assert (twin.base, twin.value, twin.map_mode) == (c.base, c.value, "candidates")
        assert configs["gemma3 + value[smollm2] shared" if task == "arith" else "gemma3 + value[spell] shared"]
    full = {c.name: c for c in build_plan(False, installed=lambda name: True).configs}
    for name in ("gemma3 + value[smollm2] logprob", "gemma3 + value[smollm2] aligned shared"):
        assert full[name].kind == "cross-vocab-projection", name
    assert full["gemma3 + value[smollm2] aligned shared"].token_map == full["gemma3 + value[smollm2] aligned"].token_map
    assert "gemma3 + value[smollm2] shared @a=1.5" in full and "qwen1.5b + value[smollm2] @a=1.5" in full
    spell = {c.name: c for c in build_plan(True, installed=lambda name: False, task="spell").configs}
    assert spell["gemma3 + value[spell] candidates"].value.task == "spell"
