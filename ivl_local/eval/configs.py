"""What an evaluation compares: configurations and the recipes of the files they need.

A configuration is a base model, an optional value network, alpha and an optional token
map. Models are referred to by *recipe*, not by path, so a configuration list can be written
before anything exists and the harness builds (and caches) what is missing:

    Trained("smollm2-135m")                       # value net trained on the task's train split
    Trained("smollm2-135m", full_finetune=True)   # the reference: the base itself fine-tuned
    Requantized("smollm2-135m", "Q8_0")           # another quantization of a base
    AlignedMap(base="gemma3-270m", value=Trained("smollm2-135m"))   # corpus-aligned token map
    Trained("smollm2-135m", task="spell")         # trained on the second task's train split
    ProxyRef(expert=Trained("smollm2-135m", full_finetune=True), anti="smollm2-135m")  # proxy-tuning

    plan = build_plan(quick=True)   # every kind, small recipes (a smoke test)
    plan = build_plan()             # the study; Qwen same-family only when both are installed
    plan = build_plan(task="spell") # the composition rows on the second task
    plan.configs, plan.skipped      # what runs, and what was left out (and why)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Union

from ..config import VALUE_PROMPTS
from ..terms import MAP_MODES
from ..datasets import data_path

CORPUS = data_path("corpus", "corpus.txt")

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
QWEN_SMALL, QWEN_LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
QUICK_ALPHAS = (0.0, 0.5, 1.0, 1.5)
QWEN_REF_LAYERS = 4     # decoder layers the Qwen 1.5B reference fine-tunes (of 28)
QWEN_STEPS = 50         # training steps of the Qwen value net and reference (full plan)
# Tasks (task.TASKS): the study's task, and a second one with another answer type, so two
# value nets trained on different tasks can be composed and checked on both.
MAIN_TASK, OTHER_TASK = "arith", "spell"
# Shipped demonstration sets (data/) a Trained can mix instead of its task's train split:
# the chat set the default chat value network learns, the ifeval programmatic demonstrations,
# and the ifeval answers sampled from local instruct models that passed every checker.
DEMO_SETS = {"chat": "chat_train.jsonl", "ifeval": "ifeval_train.jsonl",
             "ifeval-sampled": "ifeval_train_sampled.jsonl"}

# Configuration kinds, in report order.
KINDS = (
    "base",                 # a base model alone
    "in-distribution",      # the training base + its value net
    "full-finetune",        # the training base fully fine-tuned on the same data (reference)
    "proxy-tuning",         # base + (log p_full-FT - log p_training base): the paper's baseline
    "other-quantization",   # another quantization of the training base + the same value net
    "cross-vocab",          # another family (other vocabulary) + the value net, exact-text map
    "cross-vocab-aligned",  # same, corpus-aligned token map
    "cross-vocab-candidates",  # same, exact-text map + the value's opinion of the base's top-k texts
    "cross-vocab-projection",  # same, the value's log-probabilities through the map (logprob, shared)
    "same-family",          # a larger model of the training base's family + the value net
    "norm-weight-0",        # value net trained without the norm penalty
    "other-task",           # a value net trained on the other task (does it leak into this one?)
    "composed",             # two value nets trained on different tasks, added together
    "chat-value",           # the default chat value network's recipe, before/after adding the task's demonstrations
    "alpha-sweep",          # a transfer configuration at several alphas
)
OPTIONAL_KINDS = ("same-family",)   # needs the optional Qwen models
IFEVAL_KINDS = ("chat-value",)      # only in the ifeval plan (ifeval_plan.chat_value_rows)


@dataclass(frozen=True)
class Trained:
    """A network trained on the task's train split against `base` (cached by these settings)."""

    base: str
    norm_weight: float = 1.0
    full_finetune: bool = False
    init: str = "auto"
    steps: int = 300
    extra: tuple = ()              # other TrainConfig fields as (name, value) pairs
    task: str = MAIN_TASK          # whose train split it learns (task.TASKS)
    data: tuple = ()               # DEMO_SETS names mixed instead of that split, e.g. ("chat", "ifeval")

    def __post_init__(self) -> None:
        unknown = [name for name in self.data if name not in DEMO_SETS]
        if unknown or len(set(self.data)) != len(self.data):
            raise ValueError(f"Trained.data: unknown or repeated demonstration sets {list(self.data)} "
                             f"(known: {', '.join(DEMO_SETS)})")

    @property
    def label(self) -> str:
        task = "" if self.task == MAIN_TASK else f", {self.task}"
        if self.data:
            task = ", " + "+".join(self.data)
        if self.full_finetune:
            partial = dict(self.extra).get("train_layers")
            return f"{self.base} {'partial-FT' if partial else 'full-FT'}{task.replace(',', '')}"
        norm = "" if self.norm_weight == 1.0 else f", norm {self.norm_weight:g}"
        return f"value[{self.base}{norm}{task}]"

    def recipe(self) -> dict:
        """What identifies the artifact (its cache key). The main task is left out, so the
        artifacts trained before tasks existed keep their keys."""
        out = asdict(self)
        if self.task == MAIN_TASK:
            del out["task"]
        if not self.data:          # likewise the artifacts trained before mixes existed
            del out["data"]
        return out


@dataclass(frozen=True)
class Requantized:
    """`source` re-quantized by llama.cpp to `qtype` (Q8_0, F16, Q4_0, ...)."""

    source: str
    qtype: str

    @property
    def label(self) -> str:
        return f"{self.source} {self.qtype}"


ModelRef = Union[str, Trained, Requantized]


@dataclass(frozen=True)
class ProxyRef:
    """Proxy-tuning (Liu et al. 2024), the IVL paper's baseline: the base plus
    weight * (log p_expert - log p_anti). Expert = a fine-tuned model, anti = its untuned base."""

    expert: ModelRef
    anti: ModelRef
    weight: float = 1.0

    @property
    def label(self) -> str:
        w = "" if self.weight == 1.0 else f" x{self.weight:g}"
        return f"proxy[{label_of(self.expert)} - {label_of(self.anti)}{w}]"


def label_of(ref) -> str:
    if ref is None:
        return "-"
    return ref if isinstance(ref, str) else ref.label


@dataclass(frozen=True)
class AlignedMap:
    """Token map built by ivl_local.align from a corpus (first `max_bytes` of it if set)."""

    base: ModelRef
    value: ModelRef
    corpus: str = str(CORPUS)
    max_bytes: int | None = None


@dataclass(frozen=True)
class EvalConfig:
    name: str                       # unique, short: shown in tables and plots
    kind: str                       # one of KINDS
    base: ModelRef
    value: ModelRef | None = None
    alpha: float = 1.0
    token_map: AlignedMap | None = None
    note: str = ""
    value_prompt: str = "own"       # cross-vocab: the value reads its own chat format | the base's
    proxy: ProxyRef | None = None   # proxy-tuning term (alpha does not scale it)
    extra_values: tuple = ()        # more value nets, as (ModelRef, weight) pairs, added to `value`
    map_mode: str = "raw"           # cross-vocab projection: Engine(map_mode=...), terms.MAP_MODES

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        assert self.map_mode in MAP_MODES, self.map_mode
        assert self.value_prompt in VALUE_PROMPTS, self.value_prompt
        assert not self.extra_values or self.value is not None, "extra value nets need a first one"

    @property
    def engine_key(self) -> tuple:
        """Configurations with equal keys share one loaded Engine (only alpha differs)."""
        return (self.base, self.value, self.token_map, self.value_prompt, self.proxy, self.extra_values,
                self.map_mode)

    @property
    def values(self) -> list:
        """Every value net it adds: `value`, then `extra_values`' models."""
        return ([] if self.value is None else [self.value]) + [ref for ref, _ in self.extra_values]

    @property
    def value_label(self) -> str:
        parts = [label_of(ref) for ref in self.values] + ([self.proxy.label] if self.proxy else [])
        return " + ".join(parts) if parts else "-"

    def with_(self, **changes) -> "EvalConfig":
        return replace(self, **changes)


SWEEP_SEP = " @a="    # "NAME @a=0.5": NAME at another alpha


def alpha_sweep(config: EvalConfig, alphas=ALPHAS) -> list[EvalConfig]:
    """The same configuration at each alpha (alpha 1 is the configuration itself)."""
    return [config.with_(name=f"{config.name}{SWEEP_SEP}{a:g}", kind="alpha-sweep", alpha=a)
            for a in alphas if a != config.alpha]


MAP_MODE_NOTES = {
    "candidates": "map_mode candidates: the value's log-probability of each of the base's top-k texts, "
                  "next to its raw map",
    "logprob": "map_mode logprob: the value's log-probabilities through the map (unmapped tokens: "
               "their mean), next to its raw map",
    "shared": "map_mode shared: logprob, with a value token's probability split among the base tokens "
              "mapped to it as the base splits its own, next to its raw map",
}


def with_map_mode(config: EvalConfig, mode: str) -> EvalConfig:
    """A cross-vocabulary configuration with another projection (Engine map_mode), named
    "NAME MODE"; its report row compares it with the raw-map configuration on the same items."""
    kind = "cross-vocab-candidates" if mode == "candidates" else "cross-vocab-projection"
    return config.with_(name=f"{config.name} {mode}", kind=kind, map_mode=mode, note=MAP_MODE_NOTES[mode])


def with_candidates(config: EvalConfig) -> EvalConfig:
    """The value net scoring the base's top-k candidate texts in its own tokens."""
    return with_map_mode(config, "candidates")


def with_projections(config: EvalConfig) -> list[EvalConfig]:
    """The normalised projections of a cross-vocabulary configuration: logprob, shared."""
    return [with_map_mode(config, mode) for mode in ("logprob", "shared")]


def sweep_parent(name: str) -> str:
    """The swept configuration's name: "NAME @a=0.5" -> "NAME" (other names unchanged)."""
    return name.rsplit(SWEEP_SEP, 1)[0]


@dataclass(frozen=True)
class Plan:
    """A configuration list and what was left out of it (printed, and kept in the report)."""

    configs: list[EvalConfig]
    skipped: list[str] = field(default_factory=list)


def _installed(name: str) -> bool:
    from ..models import KNOWN_MODELS

    try:
        return KNOWN_MODELS[name].locate() is not None
    except Exception:  # a broken part package counts as absent
        return False


def build_plan(quick: bool = False, installed=_installed, steps: int | None = None,
               smollm2_init: str | None = None, task: str = MAIN_TASK) -> Plan:
    """The configurations of the study. `quick`: fewer steps and alphas, same kinds.
    `task`: the main task's plan (MAIN_TASK), or the composition rows read on OTHER_TASK.
    `steps` overrides the training steps of every trained artifact (a smaller full run).
    `smollm2_init`: "pretrained" (the full plan's default) makes the SmolLM2 value nets full
    trainable copies of the base at the official lr 1e-4, as the paper did; "fresh" (the
    quick default: 10x cheaper) small llamas. Measured at 100 steps: pretrained recovered
    ~93 % of the full fine-tuning gain, fresh ~2 % (docs/results/README.md)."""
    if task == "ifeval":   # instruction following with verifiable constraints: its own rows
        from .ifeval_plan import build_ifeval_plan

        return build_ifeval_plan(quick, installed, steps, smollm2_init)
    smollm2_init = smollm2_init or ("fresh" if quick else "pretrained")
    # Quick recipes are a smoke test of every kind, not a measurement: 16 steps of 4 examples
    # (~1-3 s a step on 2 free cores; 5-10x that on a shared machine).
    steps = steps or (16 if quick else 100)
    # Task examples are ~40 tokens; max_len 96 never truncates one. No held-out evaluation
    # inside training (eval_fraction 0): the harness evaluates, and the trainer's default
    # 100-example evaluation cost as much as 8 training steps (measured).
    common = (("max_len", 96), ("batch_size", 4 if quick else 8), ("eval_every", 0), ("eval_fraction", 0.0))
    # SmolLM2 value nets: by default (full plan) a trainable copy of the whole base at the
    # official lr 1e-4, as the paper copied TinyLlama. The quick plan uses fresh small llamas
    # (2 layers, hidden 256, embeddings from the base's; logits start near 0, so lr 1e-3 is
    # stable): 10x cheaper, but at 100 steps they learned the format and not the sums
    # (measured, docs/results/README.md). A pruned:4 SmolLM2 copy started at loss 25 and was
    # unstable at 1e-3. Gemma's value net (full plan): a trainable copy of its first 4 layers at
    # 1e-4, as the default chat value net is made (the fresh llama it replaced, Dec 2026, did not
    # learn the task: 0.025 on Gemma); the quick plan keeps the fresh llama.
    fresh = common + (("learning_rate", 1e-3), ("warmup_ratio", 0.05))
    v_smol = (Trained(SMOL, init="fresh", steps=steps, extra=fresh) if smollm2_init == "fresh"
              else Trained(SMOL, init=smollm2_init, steps=steps, extra=common))
    v_smol_norm0 = replace(v_smol, norm_weight=0.0)
    # The reference fine-tunes every base weight at the official 1e-4.
    ft_smol = Trained(SMOL, full_finetune=True, steps=steps, extra=common)
    v_gemma = (Trained(GEMMA, init="fresh", steps=steps, extra=fresh) if quick
               else Trained(GEMMA, init="pruned:4", steps=steps, extra=common))
    alphas = QUICK_ALPHAS if quick else ALPHAS
    corpus_cap = 60_000 if quick else None
    skipped: list[str] = []
    # The second task's value net: the same recipe on its train split.
    v_other = replace(v_smol, task=OTHER_TASK)
    composed = EvalConfig("smollm2 + value + value[spell]", "composed", SMOL, v_smol,
                          extra_values=((v_other, 1.0),),
                          note="value nets trained on chain_sum and on spell_backward, weights 1 + 1")
    composed_half = composed.with_(name="smollm2 + value + value[spell] @w=0.5", alpha=0.5,
                                   extra_values=((v_other, 0.5),),
                                   note="the same two value nets, weights 0.5 + 0.5")
    if task == OTHER_TASK:
        # The composition on the second task: its own value net, the main task's, both.
        cross_spell = EvalConfig("gemma3 + value[spell]", "cross-vocab", GEMMA, v_other)
        cross_spell_candidates = with_candidates(cross_spell)
        cross_spell_shared = with_map_mode(cross_spell, "shared")
        configs = [EvalConfig("smollm2", "base", SMOL),
                   EvalConfig("smollm2 + value[spell]", "in-distribution", SMOL, v_other),
                   EvalConfig("smollm2 + value", "other-task", SMOL, v_smol,
                              note="the chain_sum value net on spell_backward"),
                   composed, composed_half,
                   # the spell net across vocabularies: a second task for the token map (issue 15)
                   EvalConfig("gemma3", "base", GEMMA), cross_spell, cross_spell_candidates,
                   with_map_mode(cross_spell, "logprob"), cross_spell_shared]
        if installed(QWEN_LARGE) and not quick:
            cross_qwen = EvalConfig("qwen1.5b + value[spell]", "cross-vocab", QWEN_LARGE, v_other)
            configs += [EvalConfig("qwen1.5b", "base", QWEN_LARGE), cross_qwen, with_candidates(cross_qwen)]
            configs += alpha_sweep(cross_qwen, alphas)   # its alpha, chosen on validation
        if not quick:
            configs += [a for c in (cross_spell, cross_spell_candidates, cross_spell_shared)
                        for a in alpha_sweep(c, alphas)]
            # the reverse direction: a Gemma value net (the full plan's pruned:4 recipe) on
            # SmolLM2; Gemma 270M cannot add, so chain_sum gives its value net no gain to keep
            v_gemma_other = replace(v_gemma, task=OTHER_TASK)
            reverse = EvalConfig("smollm2 + value[gemma3 spell]", "cross-vocab", SMOL, v_gemma_other)
            configs += [EvalConfig("gemma3 + value[gemma3 spell]", "in-distribution", GEMMA, v_gemma_other),
                        reverse, *alpha_sweep(reverse, alphas)]
        return Plan(configs, [f"task {task}: the composition and cross-vocabulary rows only "
                              f"(the rest is the {MAIN_TASK} study)"])
    if task != MAIN_TASK:
        raise ValueError(f"unknown task {task!r} (known: {MAIN_TASK}, {OTHER_TASK}, ifeval)")
    # Proxy-tuning, the IVL paper's baseline: the full fine-tune as expert, its untuned base as
    # anti-expert, added to each base the value net is (on SmolLM2 itself it is the full
    # fine-tune's distribution again, up to quantization: a check of the term).
    proxy = ProxyRef(expert=ft_smol, anti=SMOL)

    # Plan order is run order: what needs no training first, then everything that uses the
    # SmolLM2 value net, then the Gemma value net, then the norm-0 net (a long run stopped
    # early still has the most important comparisons).
    q8 = Requantized(SMOL, "Q8_0")
    in_dist = EvalConfig("smollm2 + value", "in-distribution", SMOL, v_smol)
    configs = [
        EvalConfig("smollm2", "base", SMOL),
        EvalConfig("gemma3", "base", GEMMA),
        EvalConfig("smollm2 Q8_0", "base", q8),
        in_dist,
        EvalConfig("smollm2 full-FT", "full-finetune", ft_smol),
    ]
    transfer = [EvalConfig("smollm2 Q8_0 + value", "other-quantization", q8, v_smol)]
    if not quick:
        # Q8_0 from Q4_1 is nearly lossless; Q4_0 is a genuinely different quantization.
        q4 = Requantized(SMOL, "Q4_0")
        configs.append(EvalConfig("smollm2 Q4_0", "base", q4))
        transfer.append(EvalConfig("smollm2 Q4_0 + value", "other-quantization", q4, v_smol))
    cross_smol = EvalConfig("gemma3 + value[smollm2]", "cross-vocab", GEMMA, v_smol)
    cross_gemma = EvalConfig("smollm2 + value[gemma3]", "cross-vocab", SMOL, v_gemma)
    transfer += [cross_smol, cross_gemma]
    configs += transfer[:-1]
    # Until 2026-11-28 the value model read the conversation in the base's format (Gemma's
    # User:/Assistant: fallback), not the SmolLM2 chat format it was trained on; kept as a
    # comparison for the Engine's default (value_prompt="own").
    configs.append(cross_smol.with_(name="gemma3 + value[smollm2] base format", value_prompt="base",
                                    note="value reads the base's prompt format"))
    aligned_smol = EvalConfig("gemma3 + value[smollm2] aligned", "cross-vocab-aligned", GEMMA, v_smol,
                              token_map=AlignedMap(GEMMA, v_smol, max_bytes=corpus_cap))
    configs.append(aligned_smol)
    configs.append(with_candidates(cross_smol))
    # the normalised projections, on the exact-text map and on the corpus-aligned one
    configs += with_projections(cross_smol) if not quick else [with_map_mode(cross_smol, "shared")]
    if not quick:
        configs.append(with_map_mode(aligned_smol, "shared"))
    if not quick:
        configs.append(EvalConfig("gemma3 + value", "in-distribution", GEMMA, v_gemma))
    configs += [
        EvalConfig("smollm2 + proxy", "proxy-tuning", SMOL, proxy=proxy),
        EvalConfig("gemma3 + proxy[smollm2]", "proxy-tuning", GEMMA, proxy=proxy),
        EvalConfig("smollm2 + value[spell]", "other-task", SMOL, v_other,
                   note="the spell_backward value net on chain_sum"),
        composed, composed_half,
        cross_gemma, with_candidates(cross_gemma),
        EvalConfig("smollm2 + value[gemma3] aligned", "cross-vocab-aligned", SMOL, v_gemma,
                   token_map=AlignedMap(SMOL, v_gemma, max_bytes=corpus_cap)),
        EvalConfig("smollm2 + value norm 0", "norm-weight-0", SMOL, v_smol_norm0),
        EvalConfig("gemma3 + value[smollm2] norm 0", "norm-weight-0", GEMMA, v_smol_norm0),
    ]

    # Same family, larger: a value net trained on Qwen 0.5B, added to Qwen 1.5B. The value net
    # is a trainable copy of the whole 0.5B (the paper's init; qwen2 converts like llama). The
    # reference fine-tunes the 1.5B as far as 24 GB allows: full fp32 AdamW on 1.5B parameters
    # needs ~25 GB, so only its last QWEN_REF_LAYERS decoder layers and final norm train
    # (partial fine-tuning; embeddings and head stay frozen).
    # Both train for QWEN_STEPS (the same data and budget; capped because a step of the
    # 630M-parameter value net takes ~27 s on 2 cores, 4-5x SmolLM2's).
    # The SmolLM2 value net and proxy-tuning on a base that can already add (the 1.5B):
    # whether a cross-vocabulary value net carries the format to it, next to the baseline.
    on_qwen_large = [EvalConfig("qwen1.5b + value[smollm2]", "cross-vocab", QWEN_LARGE, v_smol),
                     EvalConfig("qwen1.5b + proxy[smollm2]", "proxy-tuning", QWEN_LARGE, proxy=proxy)]
    if installed(QWEN_SMALL) and installed(QWEN_LARGE) and not quick:
        qwen_steps = min(steps, QWEN_STEPS)
        v_qwen = Trained(QWEN_SMALL, init="pretrained", steps=qwen_steps, extra=common)
        ref_large = Trained(QWEN_LARGE, full_finetune=True, steps=qwen_steps,
                            extra=common + (("train_layers", QWEN_REF_LAYERS),))
        same = EvalConfig("qwen1.5b + value[qwen0.5b]", "same-family", QWEN_LARGE, v_qwen)
        qwen_on_gemma = EvalConfig("gemma3 + value[qwen0.5b]", "cross-vocab", GEMMA, v_qwen)
        configs += [EvalConfig("qwen0.5b", "base", QWEN_SMALL), EvalConfig("qwen1.5b", "base", QWEN_LARGE),
                    EvalConfig("qwen0.5b + value", "in-distribution", QWEN_SMALL, v_qwen), same,
                    EvalConfig("qwen1.5b partial-FT", "full-finetune", ref_large,
                               note=f"last {QWEN_REF_LAYERS} layers + final norm fine-tuned"),
                    # the same value net across vocabularies (Qwen's 152k BPE -> SmolLM2, Gemma)
                    EvalConfig("smollm2 + value[qwen0.5b]", "cross-vocab", SMOL, v_qwen),
                    qwen_on_gemma, with_candidates(qwen_on_gemma),
                    *on_qwen_large, with_candidates(on_qwen_large[0])]
        transfer.append(same)
    else:
        for name in (QWEN_SMALL, QWEN_LARGE):
            if not installed(name):
                skipped.append(f"{name}: not installed (optional; see ivl_local.models.install_command)")
        if quick:
            skipped.append("same-family (Qwen 0.5B -> 1.5B): not in the quick set")
        else:
            skipped.append("same-family (Qwen 0.5B -> 1.5B): needs both Qwen models")
        for name in (QWEN_SMALL, QWEN_LARGE):
            if installed(name) and not quick:
                configs.append(EvalConfig(name.replace("qwen2.5-coder-", "qwen"), "base", name))
        if installed(QWEN_LARGE) and not quick:
            configs += [*on_qwen_large, with_candidates(on_qwen_large[0])]

    # The in-distribution sweep is where its alpha is chosen (on --split valid; --alpha-from).
    sweep_of = ([in_dist] + transfer + [with_candidates(cross_smol), with_map_mode(cross_smol, "shared")]
                if not quick else [cross_smol])   # quick: one cross-vocab sweep
    if installed(QWEN_LARGE) and not quick:
        sweep_of.append(on_qwen_large[0])   # SmolLM2 -> Qwen 1.5B: its alpha, chosen on validation
    for config in sweep_of:
        configs += alpha_sweep(config, alphas)
    return Plan(configs, skipped)
