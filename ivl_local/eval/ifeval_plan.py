"""The transfer study's configurations on the ifeval task (configs.build_plan(task="ifeval")).

    plan = build_ifeval_plan(quick=True)    # a smoke test of every step: small recipes
    plan = build_ifeval_plan()              # the study (Qwen rows when both Qwen models are installed)

The same rows as the arithmetic study where they apply, every trained artifact learning the
ifeval train split (data/ifeval_train.jsonl, programmatic demonstrations): the value net vs
full fine-tuning on its training base, another quantization, across vocabularies in both
directions (SmolLM2 <-> Gemma 3, SmolLM2 -> Qwen 1.5B), same family larger (Qwen 0.5B value
net on the 1.5B vs the 1.5B's partial fine-tune), proxy-tuning on every base, alpha sweeps
(their alpha is chosen on --split valid, then --alpha-from), and the default chat value
network before/after these demonstrations join its chat set (chat_value_rows).
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..datasets import data_path
from .configs import (DEMO_SETS, ALPHAS, GEMMA, QUICK_ALPHAS, QWEN_LARGE, QWEN_REF_LAYERS, QWEN_SMALL, QWEN_STEPS, SMOL,
                      EvalConfig, Plan, ProxyRef, Requantized, Trained, alpha_sweep)

TASK = "ifeval"
# Demonstrations are at most ~200 tokens with the prompt (SmolLM2's tokenizer), plus the chat
# template: 320 never truncates one.
MAX_LEN = 320


def _one_epoch(sets: tuple, batch_size: int) -> int:
    """Optimizer steps in one pass over the mixed sets' demonstrations (non-blank lines), after
    the trainer's own held-out split at TrainConfig's default share."""
    from ..train.config import TrainConfig
    from ..train.data import split_eval

    n = sum(1 for name in sets for line in data_path(DEMO_SETS[name]).read_text(encoding="utf-8").splitlines()
            if line.strip())
    train, _ = split_eval(list(range(n)), TrainConfig().eval_fraction, seed=0)
    return math.ceil(len(train) / batch_size)


def chat_value_rows() -> list[EvalConfig]:
    """The default chat value network (ivl-chat's recipe, train.api.DEFAULT_RECIPE: a pruned:4
    copy of Gemma 3 270M, one epoch of the chat demonstrations) before and after this task's
    demonstrations (programmatic and sampled) join its data, at the same recipe (one epoch;
    max_len raised to the task's so no demonstration is cut; no wall-time cap, so a busy machine
    does not change the result)."""
    from ..train.api import DEFAULT_RECIPE

    settings = {name: DEFAULT_RECIPE[name] for name in ("learning_rate", "warmup_ratio", "batch_size",
                                                         "max_len", "eval_every")}
    before_sets, after_sets = ("chat",), ("chat", TASK, TASK + "-sampled")
    before = Trained(DEFAULT_RECIPE["base"], init=DEFAULT_RECIPE["init"], task=TASK, data=before_sets,
                     steps=_one_epoch(before_sets, settings["batch_size"]),
                     extra=tuple(settings.items()))
    after = replace(before, data=after_sets, steps=_one_epoch(after_sets, settings["batch_size"]),
                    extra=tuple({**settings, "max_len": MAX_LEN}.items()))
    return [EvalConfig("gemma3 + chat value", "chat-value", before.base, before),
            EvalConfig(f"gemma3 + chat+{TASK} value", "chat-value", after.base, after)]


def build_ifeval_plan(quick: bool = False, installed=lambda name: True, steps: int | None = None,
                      smollm2_init: str | None = None) -> Plan:
    smollm2_init = smollm2_init or ("fresh" if quick else "pretrained")
    steps = steps or (16 if quick else 200)
    common = (("max_len", MAX_LEN), ("batch_size", 4 if quick else 8), ("eval_every", 0), ("eval_fraction", 0.0))
    fresh = common + (("learning_rate", 1e-3), ("warmup_ratio", 0.05))
    v_smol = (Trained(SMOL, init="fresh", steps=steps, extra=fresh, task=TASK) if smollm2_init == "fresh"
              else Trained(SMOL, init=smollm2_init, steps=steps, extra=common, task=TASK))
    ft_smol = Trained(SMOL, full_finetune=True, steps=steps, extra=common, task=TASK)
    # Gemma's value net: a trainable copy of its first 4 layers at 1e-4, as in the arithmetic
    # plan and the default chat value net (a fresh llama did not learn there); quick: fresh.
    v_gemma = (Trained(GEMMA, init="fresh", steps=steps, extra=fresh, task=TASK) if quick
               else Trained(GEMMA, init="pruned:4", steps=steps, extra=common, task=TASK))
    proxy = ProxyRef(expert=ft_smol, anti=SMOL)
    alphas = QUICK_ALPHAS if quick else ALPHAS
    skipped: list[str] = []

    in_dist = EvalConfig("smollm2 + value", "in-distribution", SMOL, v_smol)
    cross_smol = EvalConfig("gemma3 + value[smollm2]", "cross-vocab", GEMMA, v_smol)
    configs = [EvalConfig("smollm2", "base", SMOL), EvalConfig("gemma3", "base", GEMMA), in_dist,
               EvalConfig("smollm2 full-FT", "full-finetune", ft_smol), cross_smol,
               EvalConfig("smollm2 + proxy", "proxy-tuning", SMOL, proxy=proxy),
               EvalConfig("gemma3 + proxy[smollm2]", "proxy-tuning", GEMMA, proxy=proxy)]
    transfer = [cross_smol]
    if quick:
        skipped.append("ifeval quick plan: bases, the SmolLM2 value net and its full fine-tune, "
                       "Gemma + the SmolLM2 value net, proxy-tuning, one alpha sweep")
        return Plan(configs + alpha_sweep(cross_smol, alphas), skipped)

    q4 = Requantized(SMOL, "Q4_0")
    cross_gemma = EvalConfig("smollm2 + value[gemma3]", "cross-vocab", SMOL, v_gemma)
    other_quant = EvalConfig("smollm2 Q4_0 + value", "other-quantization", q4, v_smol)
    configs += [EvalConfig("smollm2 Q4_0", "base", q4), other_quant,
                EvalConfig("gemma3 + value", "in-distribution", GEMMA, v_gemma), cross_gemma]
    transfer += [other_quant, cross_gemma]
    # the norm penalty at weight 1 kept the value net's logits small (mean |logit| 0.84 at 100
    # steps, as large as its CE); does the net follow the case/quotation constraints without it?
    v_smol_norm0 = replace(v_smol, norm_weight=0.0)
    # It did (docs/results: 0.287 vs 0.125 on SmolLM2, and it carries to Gemma), so the other
    # value-net rows have a norm-0 twin: another quantization, and the reverse direction. The
    # twins take their rows' kinds, so the report pairs each with its own recipe's rows (share of
    # the full FT's gain, of the own-base gain kept across vocabularies and quantizations), and
    # gives weight 1 - weight 0 for each. After the rows they twin: a run stopped early has those.
    v_gemma_norm0 = replace(v_gemma, norm_weight=0.0)
    configs += [EvalConfig("smollm2 + value norm 0", "in-distribution", SMOL, v_smol_norm0),
                EvalConfig("gemma3 + value[smollm2] norm 0", "cross-vocab", GEMMA, v_smol_norm0),
                EvalConfig("smollm2 Q4_0 + value norm 0", "other-quantization", q4, v_smol_norm0),
                EvalConfig("gemma3 + value norm 0", "in-distribution", GEMMA, v_gemma_norm0),
                EvalConfig("smollm2 + value[gemma3] norm 0", "cross-vocab", SMOL, v_gemma_norm0)]
    norm0_swept = [c for c in configs if c.name in ("smollm2 + value norm 0", "gemma3 + value[smollm2] norm 0")]
    if installed(QWEN_LARGE):
        on_large = [EvalConfig("qwen1.5b", "base", QWEN_LARGE),
                    EvalConfig("qwen1.5b + value[smollm2]", "cross-vocab", QWEN_LARGE, v_smol),
                    EvalConfig("qwen1.5b + proxy[smollm2]", "proxy-tuning", QWEN_LARGE, proxy=proxy)]
        # the norm-0 twin of the cross-vocab row, after the rows it twins (see above)
        configs += on_large + [EvalConfig("qwen1.5b + value[smollm2] norm 0", "cross-vocab", QWEN_LARGE, v_smol_norm0)]
        transfer.append(on_large[1])
    else:
        skipped.append(f"{QWEN_LARGE}: not installed (optional; see ivl_local.models.install_command)")
    if installed(QWEN_SMALL) and installed(QWEN_LARGE):
        qwen_steps = min(steps, QWEN_STEPS)
        v_qwen = Trained(QWEN_SMALL, init="pretrained", steps=qwen_steps, extra=common, task=TASK)
        ref_large = Trained(QWEN_LARGE, full_finetune=True, steps=qwen_steps, task=TASK,
                            extra=common + (("train_layers", QWEN_REF_LAYERS),))
        same = EvalConfig("qwen1.5b + value[qwen0.5b]", "same-family", QWEN_LARGE, v_qwen)
        configs += [EvalConfig("qwen0.5b", "base", QWEN_SMALL),
                    EvalConfig("qwen0.5b + value", "in-distribution", QWEN_SMALL, v_qwen), same,
                    EvalConfig("qwen1.5b partial-FT", "full-finetune", ref_large,
                               note=f"last {QWEN_REF_LAYERS} layers + final norm fine-tuned"),
                    EvalConfig("smollm2 + value[qwen0.5b]", "cross-vocab", SMOL, v_qwen),
                    EvalConfig("gemma3 + value[qwen0.5b]", "cross-vocab", GEMMA, v_qwen)]
        transfer.append(same)
    else:
        skipped.append("same-family (Qwen 0.5B -> 1.5B): needs both Qwen models")
    configs += chat_value_rows()
    for config in [in_dist] + transfer + norm0_swept:   # alpha for each is chosen on --split valid
        configs += alpha_sweep(config, alphas)
    return Plan(configs, skipped)


__all__ = ["build_ifeval_plan", "chat_value_rows", "TASK", "MAX_LEN"]
