"""Exponential moving average of a network's weights (used for every sample)."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(step: int, max_decay: float) -> float:
    """Warmed-up decay: early steps follow the weights, so a short run does not average in
    its first, random weights. ``step <= 0`` copies the weights outright."""
    return min(max_decay, (1 + step) / (10 + step)) if step > 0 else 0.0


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for parameters; buffers (e.g. batch-norm
    statistics) are copied. Frozen parameters (``requires_grad`` false: a prior's weights under LoRA or
    embedding-only fine-tuning) are equal in both and skipped."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
