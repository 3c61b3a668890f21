"""Terms: what an Engine adds to the base model's logits at each step.

    fused = base + Σ_j w_j · T_j(z_j)[map_j]      (then, optionally, a plausibility mask)

A *term* is a method (an IVL value network, proxy-tuning, classifier-free guidance,
contrastive decoding) made of one or more *sources*: a llama.cpp context whose logits enter
the sum, with what it reads, how it follows the text (same tokens or text sync), its token
map, its transform T (raw logits, or log-softmax where the method wants normalised
log-probabilities) and the sign of its share of the term's weight. The base's own logits may
be a source too (CFG's z_cond, contrastive decoding's expert).

    Engine("gemma3-270m", terms=[ValueNet("a.ivl.gguf"), ValueNet("b.ivl.gguf", 0.5),
                                 Proxy("expert.gguf", "anti.gguf", weight=1.0),
                                 CFG(scale=1.5, negative_prompt="Be rude."),
                                 Contrastive("amateur.gguf", beta=0.5, alpha=0.1)])

The specs here are plain, validated data; the engine loads them (one llama.cpp model per
file, one context per source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import _is_int, _is_number, _shown, check_alpha, check_number
from .errors import ConfigError

WEIGHT_MAX = 100.0   # the same bound as alpha: beyond it fused float32 logits approach overflow
MAX_PARTS = 16       # logit vectors _core.fuse_terms takes in one step

# How a value network with another vocabulary speaks for the base's tokens (ValueNet.map_mode):
#   "raw"         base[i] + w · weights[i] · z_value[map[i]]            (the token map alone)
#   "candidates"  base[i] + w · weights[i] · log_softmax(z_value)[map[i]], except for the
#                 base's top-k tokens whose text is several value tokens v_1..v_n:
#                 base[i] + w · Σ_j log p_value(v_j | text so far, v_<j)   (the whole text's
#                 log-probability, scored in one batched decode of the value model)
#   "logprob"     base[i] + w · weights[i] · log_softmax(z_value)[map[i]]   (normalised; for the
#                 tokens the map leaves out, the value's mean log-probability at the step)
#   "shared"      "logprob" + w · (z_base[i] − log Σ_{j: map[j]=map[i]} exp z_base[j]): base tokens
#                 sharing one value token share its probability, split as the base splits
#                 its own among them (many-to-one; sync.LogProbProjection)
# With one vocabulary there is no map and every mode is base + w · z_value (no effect).
MAP_MODES = ("raw", "logprob", "shared", "candidates")
PROJECTION_MODES = ("logprob", "shared")   # sync.LogProbProjection
CANDIDATES_K_MAX = 32    # base candidates scored per step at most (one value batch holds them all)
DEFAULT_CANDIDATES_K = 8


def check_map_mode(value, name: str = "map_mode") -> str:
    if not isinstance(value, str) or value not in MAP_MODES:
        raise ConfigError(f"{name} must be one of {', '.join(MAP_MODES)}, got {_shown(value)}")
    return value


def refuse_candidates_with_draft(map_mode: str, draft, names=("map_mode 'candidates'", "draft")) -> None:
    """Candidate scoring is not combined with speculative decoding: each verified position
    would need its own scoring decode on top of the batch's cache."""
    if map_mode == "candidates" and draft is not None:
        raise ConfigError(f"{names[0]} does not combine with speculative decoding ({names[1]}): "
                          f"use one or the other")


def check_candidates_k(value, name: str = "candidates_k") -> int:
    """How many of the base's best tokens candidates mode scores: an integer in [1, 32]."""
    if not _is_int(value) or not 1 <= value <= CANDIDATES_K_MAX:
        raise ConfigError(f"{name} must be an integer between 1 and {CANDIDATES_K_MAX}, got {_shown(value)}")
    return int(value)


def check_weight(value, name: str = "weight") -> float:
    """A term's weight: a finite number in [-WEIGHT_MAX, WEIGHT_MAX]."""
    return check_number(value, name, -WEIGHT_MAX, WEIGHT_MAX)


def check_term_weight(kind: str, value, name: str = "weight") -> float:
    """A loaded term's weight: a value net's is its alpha ([0, ALPHA_MAX]), any other's a weight."""
    return (check_alpha if kind == "value" else check_weight)(value, name)


def _check_model(value, name: str) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{name} needs a model: a .gguf path or a known name")
    return value


@dataclass(frozen=True)
class ValueNet:
    """An IVL value network: + weight · z_value (raw logits). weight None: the file's own alpha.

    map_mode (only where the value's vocabulary differs from the base's; see MAP_MODES):
    "raw" adds the raw logit of the one value token each base token maps to; "logprob" the
    value's log-probability instead; "shared" that, with the probability of a value token
    shared by the base tokens that map to it; "candidates"
    adds the value's log-probabilities, and for the base's `candidates_k` best tokens whose
    text is several value tokens, the log-probability of that whole text (sum over its value
    tokens, scored in one batched decode of the value context, then rolled back)."""

    model: Any
    weight: float | None = None
    token_map: Any = None
    map_mode: str = "raw"
    candidates_k: int = DEFAULT_CANDIDATES_K

    def __post_init__(self) -> None:
        _check_model(self.model, "a value network")
        if self.weight is not None:
            check_alpha(self.weight, "value weight")   # a value net's weight is its alpha
        check_map_mode(self.map_mode)
        check_candidates_k(self.candidates_k)


@dataclass(frozen=True)
class Proxy:
    """Proxy-tuning / EFT: + weight · (log p_expert − log p_anti_expert). Expert and
    anti-expert share one vocabulary (which may differ from the base's: then mapped)."""

    expert: Any
    anti_expert: Any
    weight: float = 1.0
    token_map: Any = None

    def __post_init__(self) -> None:
        _check_model(self.expert, "proxy-tuning's expert")
        _check_model(self.anti_expert, "proxy-tuning's anti-expert (the expert's untuned base)")
        check_weight(self.weight, "proxy weight")


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance: + scale · (z_cond − z_uncond), z_uncond from a second context
    on the same loaded base model reading `negative_prompt` (default: nothing) and the answer."""

    scale: float
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        check_weight(self.scale, "cfg scale")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError(f"negative_prompt must be text, got {_shown(self.negative_prompt)}")


@dataclass(frozen=True)
class Contrastive:
    """Contrastive decoding (Li et al. 2023): + beta · (log p_base − log p_amateur) over the
    tokens whose base probability is at least alpha · max; the others are masked out."""

    amateur: Any
    beta: float = 0.5
    alpha: float = 0.1
    token_map: Any = None

    def __post_init__(self) -> None:
        _check_model(self.amateur, "contrastive decoding's amateur")
        check_weight(self.beta, "cd beta")
        if not (_is_number(self.alpha) and 0.0 < float(self.alpha) <= 1.0):
            raise ConfigError(f"cd alpha must be in (0, 1], got {_shown(self.alpha)}")


SPECS = (ValueNet, Proxy, CFG, Contrastive)


# --- loaded terms (built by the engine) -------------------------------------------------------

BASE = None   # a part whose logits are the base's own
RAW, LOG_SOFTMAX = "raw", "log_softmax"   # the transforms _core.fuse_terms knows


@dataclass
class Source:
    """One llama.cpp context whose logits enter the fused sum."""

    name: str
    ctx: Any                    # backend.Context
    follower: Any               # sync.KVSequence | sync.TextSync | sync.FixedPrompt
    mapping: Any = None         # vocab.TokenMapping onto the base's vocabulary; None = the same
    reads_own_chat: bool = False   # a cross-vocabulary value net reads the chat in its format
    template: str | None = None    # its chat template (for reads_own_chat)
    eos_text: str = ""
    scorer: Any = None          # sync.CandidateScorer: map_mode "candidates" across vocabularies
    projection: Any = None      # sync.LogProbProjection: map_mode "logprob" / "shared" across them

    @property
    def extra_parts(self) -> int:
        """Logit vectors this source adds to the fuse besides its own."""
        if self.scorer is not None:
            return 2
        return 0 if self.projection is None else self.projection.n_extra

    @property
    def token_map(self):
        return None if self.mapping is None else self.mapping.token_map

    @property
    def token_weights(self):
        return None if self.mapping is None else self.mapping.token_weights


@dataclass
class Term:
    """A loaded method: parts (source or BASE, sign, transform) sharing one live weight."""

    kind: str                   # "value" | "proxy" | "cfg" | "contrastive"
    name: str
    parts: list[tuple[Source | None, float, str]]
    _weight: float = 1.0
    mask_alpha: float = 0.0     # contrastive decoding's plausibility mask (0 = none)
    spec: Any = field(default=None, repr=False)

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value) -> None:
        self._weight = check_term_weight(self.kind, value, f"{self.name} weight")

    @property
    def sources(self) -> list[Source]:
        return [source for source, _, _ in self.parts if source is not None]
