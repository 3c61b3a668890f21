"""`ivl chat` / `ivl-chat`: one-shot answers and the interactive session.

    ivl-chat                                  # gemma3-270m + the default value network
    ivl-chat --value none -p "Hello"          # base alone, one answer, streamed
    echo "Hello" | ivl-chat --json            # OpenAI-style chat.completion on stdout

The engine is made by `make_engine` (tests replace it with a fake). Everything the user can
get wrong (a flag value, a missing file, an empty prompt) is checked before the models load.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field, replace
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import (VALUE_PROMPTS, EngineConfig, SamplingConfig, check_alpha, check_max_tokens,
                      check_seed, default_threads)
from ..errors import ConfigError, EmptyPromptError, ModelFileError, ModelNotFoundError
from ._common import EXIT_INTERRUPTED, one_line_warnings, print_note, user_errors

DEFAULT_BASE = "gemma3-270m"
DEFAULT_MAX_TOKENS = 512
DEFAULT_CTX = 2048
DEFAULT_VALUE_DIR = "default-value"   # under models.cache_dir()
NO_VALUE = ("none", "off", "")


def make_engine(base: Path, value: Path | None, alpha: float | None, *, n_ctx: int,
                n_threads: int | None, seed: int, token_map: Path | None, verbose: bool,
                value_prompt: str = "own", terms=(), draft=None, draft_max: int = 8,
                map_mode: str = "raw", candidates_k: int = 8):
    """The one place the CLI builds an Engine (monkeypatched by the fast tests)."""
    from ..engine import Engine  # llama.cpp loads here, not at CLI import

    return Engine(base, value, alpha, terms=terms, n_ctx=n_ctx, n_threads=n_threads, seed=seed,
                  token_map=token_map, verbose=verbose, value_prompt=value_prompt,
                  draft=draft, draft_max=draft_max, map_mode=map_mode, candidates_k=candidates_k)


def check_draft_flag(draft: str | None):
    """--draft: 'ngram', or a model found and its header checked now (its vocabulary is
    compared with the base's when the engine loads)."""
    from ..speculative import NGRAM, check_draft

    draft = check_draft(draft)
    if draft is None or draft == NGRAM:
        return draft
    from ..models import resolve_model
    from ..valuefile import read_gguf_header

    path = resolve_model(draft)
    read_gguf_header(path)
    return path


def split_value(text: str) -> tuple[str, float | None]:
    """--value 'b.ivl.gguf:0.5' -> ('b.ivl.gguf', 0.5), the weight checked as an alpha; a colon
    not followed by a number is part of the name."""
    name, sep, tail = text.rpartition(":")
    if not sep or not name:
        return text, None
    try:
        weight = float(tail)
    except ValueError:
        return text, None
    return name, check_alpha(weight, "--value weight")


def build_terms(values: list[str], expert, anti_expert, proxy_weight, cfg_scale, negative_prompt,
                amateur, cd_beta, cd_alpha, token_map, map_mode: str = "raw", candidates_k: int = 8) -> list:
    """The term specs the flags ask for, beyond the first --value: each flag checked and each
    file found and its header validated now, before any model loads."""
    from ..models import resolve_model
    from ..terms import CFG, Contrastive, Proxy, ValueNet
    from ..valuefile import read_gguf_header

    def model_file(ref: str):
        path = resolve_model(ref)
        read_gguf_header(path)
        return path

    terms = []
    for text in values:
        name, weight = split_value(text)
        if name.strip().lower() in NO_VALUE:
            raise ConfigError("'none' can only be the first --value (it means: no default value network)")
        spec = ValueNet(name, weight, token_map, map_mode, candidates_k)   # numbers first: they fail fastest
        terms.append(replace(spec, model=model_file(name)))
    if (expert is None) != (anti_expert is None):
        raise ConfigError("proxy-tuning needs both --expert and --anti-expert (the expert's untuned base)")
    if expert is not None:
        spec = Proxy(expert, anti_expert, 1.0 if proxy_weight is None else proxy_weight)
        terms.append(replace(spec, expert=model_file(expert), anti_expert=model_file(anti_expert)))
    elif proxy_weight is not None:
        raise ConfigError("--proxy-weight needs --expert and --anti-expert")
    if cfg_scale is not None:
        terms.append(CFG(cfg_scale, negative_prompt or ""))
    elif negative_prompt is not None:
        raise ConfigError("--negative-prompt needs --cfg-scale")
    if amateur is not None:
        spec = Contrastive(amateur, 0.5 if cd_beta is None else cd_beta, 0.1 if cd_alpha is None else cd_alpha)
        terms.append(replace(spec, amateur=model_file(amateur)))
    elif cd_beta is not None or cd_alpha is not None:
        raise ConfigError("--cd-beta and --cd-alpha need --amateur")
    return terms


# --- the composition flags (ivl chat and ivl serve take the same) ---------------------------

BaseOption = Annotated[str, typer.Option(
    "--base", "-b", help="Base model: a .gguf path or a known name (see 'ivl models').", rich_help_panel="Models")]
ValueOption = Annotated[Optional[list[str]], typer.Option(
    "--value", help="Value network: .ivl.gguf path, known name, or 'none' for the base alone. "
    "Repeat to add more, each with an optional weight after ':' (b.ivl.gguf:0.5). "
    "Default: the default value network (ivl chat prepares it on first use).", rich_help_panel="Models")]
ExpertOption = Annotated[Optional[str], typer.Option(
    help="Proxy-tuning: a tuned model whose log-probabilities, minus its --anti-expert's, are added.",
    rich_help_panel="Composition")]
AntiExpertOption = Annotated[Optional[str], typer.Option(
    help="Proxy-tuning: the expert's untuned base (same vocabulary as --expert).", rich_help_panel="Composition")]
ProxyWeightOption = Annotated[Optional[float], typer.Option(
    help="Proxy-tuning weight. Default 1.", rich_help_panel="Composition")]
CfgScaleOption = Annotated[Optional[float], typer.Option(
    help="Classifier-free guidance scale g: adds g * (z_cond - z_uncond).", rich_help_panel="Composition")]
NegativePromptOption = Annotated[Optional[str], typer.Option(
    help="CFG: what the unconditional context reads (default: nothing).", rich_help_panel="Composition")]
AmateurOption = Annotated[Optional[str], typer.Option(
    help="Contrastive decoding: a weaker model whose log-probabilities are subtracted.",
    rich_help_panel="Composition")]
CdBetaOption = Annotated[Optional[float], typer.Option(
    help="Contrastive decoding strength. Default 0.5.", rich_help_panel="Composition")]
CdAlphaOption = Annotated[Optional[float], typer.Option(
    help="Contrastive decoding plausibility: keep tokens with p >= alpha * max p. Default 0.1.",
    rich_help_panel="Composition")]
AlphaOption = Annotated[Optional[float], typer.Option(
    help="Scale of the value network (0 = base alone). Default: the value file's own.", rich_help_panel="Models")]
MapOption = Annotated[Optional[Path], typer.Option(
    "--map", help="Token map .npz for base/value vocabularies that differ (default: built and cached).",
    rich_help_panel="Models")]
ValuePromptOption = Annotated[str, typer.Option(
    help="What a value model with another vocabulary reads: 'own' = the chat in its own "
    "format (as trained), 'base' = the base's rendering.", rich_help_panel="Models")]
MapModeOption = Annotated[str, typer.Option(
    "--map-mode", help="How a value network with another vocabulary speaks for the base's tokens: "
    "'raw' = the raw logit of each base token's mapped value token; 'logprob' = its "
    "log-probability; 'shared' = that, split among the base tokens that map to one value token; "
    "'candidates' = the value's log-probabilities, and for the base's --candidates-k best tokens "
    "that are several value tokens, the log-probability of their whole text (one extra value "
    "decode per step). No effect with one vocabulary.", rich_help_panel="Models")]
CandidatesKOption = Annotated[int, typer.Option(
    "--candidates-k", help="--map-mode candidates: how many of the base's best tokens are scored "
    "per step (1-32).", rich_help_panel="Models")]
CtxOption = Annotated[int, typer.Option(help="Context window (tokens) of each model.", rich_help_panel="Resources")]
DraftOption = Annotated[Optional[str], typer.Option(
    "--draft", help="Speculative decoding (same output, faster where drafts are accepted): 'ngram' "
    "(prompt lookup, no model) or a draft model with the base's vocabulary.", rich_help_panel="Speed")]
DraftMaxOption = Annotated[int, typer.Option(
    "--draft-max", help="Speculative decoding: most tokens drafted per step (1-32; fewer while "
    "drafts are rejected).", rich_help_panel="Speed")]
ThreadsOption = Annotated[Optional[int], typer.Option(
    help="CPU threads (default: one per free core, from the load average).", rich_help_panel="Resources")]
DebugOption = Annotated[bool, typer.Option(help="Show tracebacks for errors.")]


@dataclass
class Composition:
    """What the composition flags ask to load: the checked flags, then the files found."""

    values: list[str]                # every --value, as given
    alpha: float | None              # the first value network's weight (--alpha or ':WEIGHT')
    token_map: Path | None
    value_prompt: str
    map_mode: str = "raw"
    candidates_k: int = 8
    base: Path | None = None         # resolve() fills these
    value: Path | None = None
    terms: list = field(default_factory=list)

    @classmethod
    def check(cls, value: list[str] | None, alpha, token_map, value_prompt, map_mode: str = "raw",
              candidates_k: int = 8, draft=None) -> "Composition":
        """The cheap checks (milliseconds, no file read but the map's existence)."""
        from ..terms import check_candidates_k, check_map_mode, refuse_candidates_with_draft

        if alpha is not None:
            check_alpha(alpha, "--alpha")
        values = list(value or [])
        first_weight = split_value(values[0])[1] if values else None
        if first_weight is not None and alpha is not None:
            raise ConfigError("give the first value network's weight once: --alpha or ':WEIGHT'")
        if token_map is not None and not token_map.is_file():
            raise ModelFileError(f"no such token map file: {token_map}")
        if value_prompt not in VALUE_PROMPTS:
            raise ConfigError(f"--value-prompt must be {' or '.join(VALUE_PROMPTS)}, got {value_prompt!r}")
        check_map_mode(map_mode, "--map-mode")
        check_candidates_k(candidates_k, "--candidates-k")
        refuse_candidates_with_draft(map_mode, draft, ("--map-mode candidates", "--draft"))
        return cls(values, first_weight if first_weight is not None else alpha, token_map, value_prompt,
                   map_mode, candidates_k)

    def resolve(self, base: str, expert, anti_expert, proxy_weight, cfg_scale, negative_prompt,
                amateur, cd_beta, cd_alpha, *, prepare_default: bool = True) -> "Composition":
        """Find and validate every file (the default value network: prepared on first use
        when `prepare_default`, else an error saying how), before any model loads."""
        from ..models import resolve_model

        self.terms = build_terms(self.values[1:], expert, anti_expert, proxy_weight, cfg_scale,
                                 negative_prompt, amateur, cd_beta, cd_alpha, self.token_map,
                                 self.map_mode, self.candidates_k)
        self.base = resolve_model(base)
        self.value = resolve_value(split_value(self.values[0])[0] if self.values else None,
                                   prepare=prepare_default)
        return self

    def engine_kwargs(self) -> dict:
        kwargs = dict(token_map=self.token_map, value_prompt=self.value_prompt, terms=self.terms)
        if self.map_mode != "raw":   # only when asked: Engine fakes in tests need not know it
            kwargs.update(map_mode=self.map_mode, candidates_k=self.candidates_k)
        return kwargs


# --- resolving what to load ---------------------------------------------------------------

def default_value_dir() -> Path:
    from ..models import cache_dir

    return cache_dir() / DEFAULT_VALUE_DIR


def find_default_value() -> Path | None:
    """The newest `.ivl.gguf` in the default value folder, if one was prepared."""
    folder = default_value_dir()
    files = sorted(folder.rglob("*.ivl.gguf"), key=lambda p: p.stat().st_mtime) if folder.exists() else []
    return files[-1] if files else None


def prepare_default_value() -> Path:
    """Train the default value network once (the `train` extra's `default_recipe`).

    It runs as `ivl train --recipe default` in a child process: torch and its memory never
    enter the chat process, and the recipe draws its own progress on this terminal.
    """
    from ..train.api import recipe_estimate   # no torch: the recipe's constants only

    out_dir = default_value_dir()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print_note("The default value network is not prepared yet. Preparing it is a one-time step "
               f"(training a small value network on this machine): {recipe_estimate(cores, load)}.")
    print_note("To chat with the base model alone instead, pass --value none.")
    if not torch_available():
        raise ModelNotFoundError(
            "preparing the default value network needs PyTorch (the 'train' extra): "
            f"{sys.executable} -m pip install 'ivl-local[train]'  (or skip it with --value none)")
    cmd = [sys.executable, "-m", "ivl_local.cli.main", "train", "--recipe", "default",
           "--out", str(out_dir)]
    rc = run_child(cmd)
    if rc in (EXIT_INTERRUPTED, -2):
        raise KeyboardInterrupt
    found = find_default_value()
    if rc != 0 or found is None:
        raise ModelFileError(
            f"preparing the default value network failed (exit code {rc}); see the messages "
            f"above, or run 'ivl train --recipe default --out {out_dir} --debug'; --value none skips it")
    print_note(f"default value network ready: {found}")
    return found


def run_child(cmd: list[str]) -> int:
    """Run a child process in this terminal and return its exit code.

    The child's stdout goes to this process's stderr: stdout carries the answer alone (the
    child `ivl train` prints the value file's path there, which broke `ivl-chat -p ... | cmd`).
    Ctrl-C is left to the child (a training run saves a resumable checkpoint before it
    exits with 130); this process ignores it until the child is gone.
    """
    import signal

    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):   # a replaced sys.stderr (tests, embedding)
        stderr_fd = 2
    child = subprocess.Popen(cmd, stdout=stderr_fd)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def torch_available() -> bool:
    """Whether the 'train' extra is installed (looked up without importing torch)."""
    return importlib.util.find_spec("torch") is not None


def resolve_value(value: str | None, prepare: bool = True) -> Path | None:
    """--value: None -> the default value network (prepared on first use, or an error when
    not `prepare`); 'none' -> no value."""
    from ..models import resolve_model

    if value is not None and value.strip().lower() in NO_VALUE:
        return None
    if value is not None:
        return resolve_model(value)
    found = find_default_value()
    if found is None and not prepare:
        raise ModelNotFoundError("the default value network is not prepared yet: run 'ivl chat' once "
                                 "(it prepares it), give --value PATH, or --value none for the base alone")
    return found or prepare_default_value()


def build_sampling(temperature, top_p, top_k, min_p, repeat_penalty, seed) -> SamplingConfig:
    """Only the flags the user gave override SamplingConfig's defaults."""
    given = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                 repeat_penalty=repeat_penalty, seed=seed)
    return SamplingConfig(**{k: v for k, v in given.items() if v is not None})


def read_one_shot_prompt(prompt: str | None) -> str | None:
    """-p wins; otherwise stdin when it is not a terminal; None means interactive."""
    if prompt is not None:
        text = prompt
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        return None
    if not text.strip():
        raise EmptyPromptError("the prompt is empty (give text with -p or on stdin)")
    return text.strip("\n")


# --- one-shot ------------------------------------------------------------------------------

def one_shot(engine, messages: list[dict], *, sampling: SamplingConfig, max_tokens: int,
             as_json: bool, verbose: bool) -> None:
    if as_json:
        result = engine.chat(messages, stream=False, max_tokens=max_tokens, sampling=sampling)
        print(json.dumps(result, indent=2, ensure_ascii=False), flush=True)
        return
    out = sys.stdout
    last = "\n"
    for delta in engine.chat_deltas(messages, max_tokens=max_tokens, sampling=sampling):
        out.write(delta)
        out.flush()
        last = delta
    if not last.endswith("\n"):
        out.write("\n")
        out.flush()
    if verbose:
        from .session import stats_line

        print_note(stats_line(engine.stats))


# --- the command ----------------------------------------------------------------------------

def chat(
    base: BaseOption = DEFAULT_BASE,
    value: ValueOption = None,
    expert: ExpertOption = None,
    anti_expert: AntiExpertOption = None,
    proxy_weight: ProxyWeightOption = None,
    cfg_scale: CfgScaleOption = None,
    negative_prompt: NegativePromptOption = None,
    amateur: AmateurOption = None,
    cd_beta: CdBetaOption = None,
    cd_alpha: CdAlphaOption = None,
    alpha: AlphaOption = None,
    token_map: MapOption = None,
    value_prompt: ValuePromptOption = "own",
    map_mode: MapModeOption = "raw",
    candidates_k: CandidatesKOption = 8,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", help="Answer this prompt and exit (one-shot). Also: text piped on stdin.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One-shot: print an OpenAI-style chat.completion object.")] = False,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy. Default 0.8.", rich_help_panel="Sampling")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling; 1 disables. Default 0.95.", rich_help_panel="Sampling")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="0 disables. Default 40.", rich_help_panel="Sampling")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="0 disables. Default 0.05.", rich_help_panel="Sampling")] = None,
    repeat_penalty: Annotated[Optional[float], typer.Option(help="1 disables. Default 1.0.", rich_help_panel="Sampling")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.", rich_help_panel="Sampling")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens in one answer.", rich_help_panel="Sampling")] = DEFAULT_MAX_TOKENS,
    ctx: CtxOption = DEFAULT_CTX,
    threads: ThreadsOption = None,
    draft: DraftOption = None,
    draft_max: DraftMaxOption = 8,
    debug: DebugOption = False,
    verbose: Annotated[bool, typer.Option(help="llama.cpp logs and per-answer timings on stderr.")] = False,
) -> None:
    """Chat with a base model steered by a value network (streamed, multi-turn).

    Interactive when stdin is a terminal and no -p is given; type /help there.
    """
    engine = None
    try:
        with user_errors(debug), one_line_warnings():
            # Everything cheap first: a typo fails in milliseconds, not after loading models.
            if seed is not None:
                check_seed(seed, "--seed")
            sampling = build_sampling(temperature, top_p, top_k, min_p, repeat_penalty, seed)
            check_max_tokens(max_tokens, "--max-tokens")
            EngineConfig(n_ctx=ctx, n_threads=threads or default_threads(), draft_max=draft_max)
            draft = check_draft_flag(draft)
            composition = Composition.check(value, alpha, token_map, value_prompt, map_mode, candidates_k, draft)
            text = read_one_shot_prompt(prompt)
            if as_json and text is None:
                raise ConfigError("--json needs a prompt: -p TEXT or text on stdin")
            composition.resolve(base, expert, anti_expert, proxy_weight, cfg_scale, negative_prompt,
                                amateur, cd_beta, cd_alpha)
            base_path, value_path, alpha = composition.base, composition.value, composition.alpha
            kwargs = dict(n_ctx=ctx, n_threads=threads, seed=seed if seed is not None else 0,
                          verbose=verbose, **composition.engine_kwargs())
            if draft is not None:
                kwargs.update(draft=draft, draft_max=draft_max)
            if text is None and not verbose:
                # Interactive: the prompt shows at once, the models load while the user types.
                from .loading import BackgroundLoad
                from .session import ChatSession

                engine = BackgroundLoad(lambda: make_engine(base_path, value_path, alpha, **kwargs))
                ChatSession(None, loader=engine, base_path=base_path, value_path=value_path,
                            system=system, sampling=sampling, max_tokens=max_tokens,
                            verbose=verbose, debug=debug).run()
                return
            engine = make_engine(base_path, value_path, alpha, **kwargs)
            if text is not None:
                messages = ([{"role": "system", "content": system}] if system else []) + \
                           [{"role": "user", "content": text}]
                one_shot(engine, messages, sampling=sampling, max_tokens=max_tokens,
                         as_json=as_json, verbose=verbose)
            else:
                from .session import ChatSession

                ChatSession(engine, base_path=base_path, value_path=value_path, system=system,
                            sampling=sampling, max_tokens=max_tokens, verbose=verbose,
                            debug=debug).run()
    except KeyboardInterrupt:
        sys.stdout.flush()
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        if engine is not None:
            engine.close()
