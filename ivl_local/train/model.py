"""Frozen base and value network in torch.

The base is loaded once from its GGUF (transformers dequantises it to fp32), frozen
(requires_grad False, eval()) and only ever run under torch.no_grad(). The value network is
a causal LM over the base's vocabulary that ivl-convert can write as a plain llama.cpp model
(ivl_local.ckpt_layout.CONVERTIBLE_ARCHS: llama, qwen2, gemma3):

    pretrained   a trainable copy of a llama-, qwen2- or gemma3-arch model with the base's
                 tokenizer (the base itself by default, as the paper did with TinyLlama)
    pruned:K     that copy cut to its first K decoder layers (+ embeddings, final norm, head)
    fresh        a small llama (TrainConfig.fresh_*), tied embeddings, optionally initialised
                 from the base's input embeddings (PCA-projected when narrower)
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ..ckpt_layout import CONVERTIBLE_ARCHS
from ..errors import ConfigError, ModelFileError
from ..models import resolve_model
from .basefile import BaseGGUF
from .config import TrainConfig


def load_causal_lm(name_or_path: str | os.PathLike) -> nn.Module:
    """A known model name, a .gguf file or an HF folder -> fp32 causal LM on the CPU."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    text = os.fspath(name_or_path)
    hf_logging.set_verbosity_error()  # GGUF dequantisation logs a line per tensor type
    try:
        if Path(text).is_dir():
            model = AutoModelForCausalLM.from_pretrained(text, dtype=torch.float32)
        else:
            path = resolve_model(text)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFileError(f"cannot load {text} into torch: {str(e).splitlines()[0]}") from None
    # Dequantised weights are ordinary fp32 layers; the quantization config would only stop
    # save_pretrained and confuse a reader of the saved config.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_init(cfg: TrainConfig, base_model: nn.Module) -> str:
    if cfg.init != "auto":
        return cfg.init
    return "pretrained" if base_model.config.model_type in CONVERTIBLE_ARCHS else "fresh"


def build_value_net(cfg: TrainConfig, base: BaseGGUF, base_model: nn.Module) -> tuple[nn.Module, str]:
    """-> (trainable causal LM, init description for the recipe metadata)."""
    init = resolve_init(cfg, base_model)
    if init == "fresh":
        return _fresh(cfg, base, base_model), "fresh"
    source = base_model if cfg.init_from is None else load_causal_lm(cfg.init_from)
    if source.config.model_type not in CONVERTIBLE_ARCHS:
        raise ConfigError(f"init {init} needs a {' or '.join(CONVERTIBLE_ARCHS)} model to copy, got "
                          f"{source.config.model_type} (use init='fresh' for this base)")
    if source.config.vocab_size != base.vocab_size:
        raise ConfigError(f"init model vocabulary ({source.config.vocab_size}) differs from the "
                          f"base's ({base.vocab_size}); it must share the base's tokenizer")
    value = copy.deepcopy(source) if source is base_model else source
    if init.startswith("pruned:"):
        k = int(init.split(":")[1])
        n = value.config.num_hidden_layers
        if k > n:
            raise ConfigError(f"init {init}: the model has only {n} layers")
        value.model.layers = value.model.layers[:k]
        value.config.num_hidden_layers = k
        if getattr(value.config, "layer_types", None):
            value.config.layer_types = value.config.layer_types[:k]
    value.train()
    for p in value.parameters():
        p.requires_grad_(True)
    return value, init


def _fresh(cfg: TrainConfig, base: BaseGGUF, base_model: nn.Module) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=base.vocab_size,
        hidden_size=cfg.fresh_hidden,
        intermediate_size=cfg.fresh_intermediate,
        num_hidden_layers=cfg.fresh_layers,
        num_attention_heads=cfg.fresh_heads,
        num_key_value_heads=cfg.fresh_kv_heads,
        max_position_embeddings=8192,   # RoPE has no learned positions; the runtime may go long
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,       # a 262k x H head untied would double the parameters
        bos_token_id=base.bos_id,
        eos_token_id=base.eos_id,
        initializer_range=0.02,
    )
    torch.manual_seed(cfg.seed)
    value = LlamaForCausalLM(config)
    if cfg.fresh_embed_from_base:
        with torch.no_grad():
            value.model.embed_tokens.weight.copy_(
                _project_embeddings(base_model.get_input_embeddings().weight, cfg.fresh_hidden,
                                    std=config.initializer_range))
    value.tie_weights()
    value.train()
    return value


@torch.no_grad()
def _project_embeddings(base_embeddings: torch.Tensor, hidden: int, std: float) -> torch.Tensor:
    """(V, H_base) -> (V, hidden): the base's own embedding when widths match, else its
    projection on the top principal directions; rescaled to the llama init std."""
    emb = base_embeddings.float()
    if emb.shape[1] != hidden:
        if hidden > emb.shape[1]:
            raise ConfigError(f"fresh_hidden {hidden} is wider than the base's embeddings "
                              f"({emb.shape[1]}); set fresh_embed_from_base=False")
        centred = emb - emb.mean(0, keepdim=True)
        covariance = centred.T @ centred                      # (H_base, H_base)
        _, eigenvectors = torch.linalg.eigh(covariance)       # ascending eigenvalues
        emb = centred @ eigenvectors[:, -hidden:].flip(1)     # (V, hidden)
    return emb * (std / emb.std().clamp_min(1e-12))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and (p.requires_grad or not trainable_only):
            seen.add(id(p))
            total += p.numel()
    return total
