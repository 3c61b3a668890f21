"""The IVL objective, computed in chunks of positions so a 262k vocabulary fits in memory.

    fused  = base_logits + value_logits                      # residual connection
    loss   = CE(log_softmax(fused), next token)  on response tokens only
           + norm_weight * mean(|value_logits|)  over the vocabulary, then over positions

The official code averages |value_logits| over every position of the batch (prompt
included; here padding excluded); norm_positions="response" restricts it to the positions
whose next token is a response token. Base logits are only computed where a response token
is scored. Batches of more than `chunk` positions are split into chunks whose value logits
are recomputed in backward (activation checkpointing), so memory stays O(chunk x vocab)
instead of O(batch x length x vocab).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE

Head = Callable[[torch.Tensor], torch.Tensor]   # (N, H) hidden -> (N, V) logits


@dataclass
class LossParts:
    loss: torch.Tensor       # scalar, differentiable
    ce: float                # mean CE per response token
    norm: float              # mean |value logit|
    n_response: int          # response tokens scored
    n_correct: int           # of which argmax(fused) == target


def _chunk_terms(value_hidden, base_logits, targets, norm_mask, value_head: Head):
    """Sums over one chunk: CE where targets != IGNORE, |value| where norm_mask."""
    value_logits = value_head(value_hidden)                       # (n, V)
    norm_sum = (value_logits.float().abs().mean(-1) * norm_mask).sum()
    scored = targets != IGNORE
    if not bool(scored.any()):
        zero = value_logits.new_zeros(())
        return zero, norm_sum, zero.long()
    fused = value_logits[scored].float()                          # (r, V)
    if base_logits is not None:
        fused = fused + base_logits                               # residual connection
    ce_sum = F.cross_entropy(fused, targets[scored], reduction="sum")
    correct = (fused.detach().argmax(-1) == targets[scored]).sum()
    return ce_sum, norm_sum, correct


def fused_loss(value_hidden: torch.Tensor, base_hidden: torch.Tensor | None, targets: torch.Tensor,
               norm_mask: torch.Tensor, value_head: Head, base_head: Head | None,
               norm_weight: float, chunk: int = 1024,
               denominators: tuple[int, int] | None = None) -> LossParts:
    """value_hidden (N, Hv) and base_hidden (N, Hb): the real (non-padding) positions of a
    batch; targets (N,): the next token, IGNORE where it is not a response token;
    norm_mask (N,): 1.0 where the norm penalty applies. base_head None (full fine-tuning
    reference): the model's own logits are scored. denominators (response tokens, norm
    positions): divide by these instead of this batch's own counts -- a process's share of a
    global batch split over processes, whose shares sum to the global mean.

    Base logits are computed once, only where a response token is scored (never recomputed
    in backward); chunks larger than `chunk` positions recompute their value logits in
    backward instead of storing them."""
    n = value_hidden.shape[0]
    ce_sum = value_hidden.new_zeros(())
    norm_sum = value_hidden.new_zeros(())
    correct = 0
    use_checkpoint = value_hidden.requires_grad and n > chunk
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        base_logits = None
        if base_head is not None:
            with torch.no_grad():                                 # frozen base: (r, V)
                base_logits = base_head(base_hidden[part][targets[part] != IGNORE]).float()
        args = (value_hidden[part], base_logits, targets[part], norm_mask[part], value_head)
        if use_checkpoint:
            c, m, k = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            c, m, k = _chunk_terms(*args)
        ce_sum = ce_sum + c
        norm_sum = norm_sum + m
        correct += int(k)
    n_response = int((targets != IGNORE).sum())
    n_norm = float(norm_mask.sum())
    ce_div, norm_div = denominators if denominators is not None else (n_response, n_norm)
    ce = ce_sum / max(ce_div, 1)
    norm = norm_sum / max(norm_div, 1.0)
    loss = ce + norm_weight * norm
    return LossParts(loss, float(ce.detach()), float(norm.detach()), n_response, correct)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) unshifted labels -> (B, T) target of each position: labels[t + 1], IGNORE at
    the last position."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets


def norm_mask_of(attention_mask: torch.Tensor, targets: torch.Tensor, positions: str) -> torch.Tensor:
    if positions == "all":
        return attention_mask.float()
    return ((targets != IGNORE) & attention_mask.bool()).float()
