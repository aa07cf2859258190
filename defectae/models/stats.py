"""Model size and cost: parameter count and FLOPs per sample (torch.utils.flop_counter)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def flops_per_sample(model: nn.Module, channels: int, size: int, batch: int = 2) -> int:
    """FLOPs of one eval-mode forward per sample (a multiply-add counts as 2)."""
    was_training = model.training
    model.eval()
    x = torch.rand(batch, channels, size, size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // batch
