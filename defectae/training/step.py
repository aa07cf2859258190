"""One training step, validation, the data order and the learning-rate schedule: the loop's pure parts."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from defectae import device as devices
from defectae.core.losses import compute_losses
from defectae.core.ssim import ssim_map
from defectae.errors import DefectaeError
from defectae.models.backbones import FrozenEncoder, build_backbone
from defectae.profiles import LossConfig, TrainConfig

Tensor = torch.Tensor


class Objective(nn.Module):
    """The training loss of one batch: the model's own objective (diffusion) or `compute_losses`.

    One module, so that DDP wraps the whole loss computation (its gradient hooks need forward).
    With loss.perceptual_weight > 0 it holds the frozen encoder of the perceptual term, on the
    model's device; the optimizer and the checkpoint see the model only.
    """

    def __init__(self, model: nn.Module, loss: LossConfig) -> None:
        super().__init__()
        self.model, self.loss = model, loss_kwargs(loss)
        self.own = hasattr(devices.unwrap(model), "training_losses")
        self.perceptual = self._encoder(loss) if loss.perceptual_weight > 0 else None

    def forward(
        self, clean: Tensor, inputs: Tensor, mask: Tensor | None, epoch: int
    ) -> dict[str, Tensor]:
        if self.own:
            return own_losses(self.model, clean, inputs, mask)
        return self.terms(self.model(inputs), clean, mask, epoch)

    def terms(
        self, out: dict[str, Tensor], clean: Tensor, mask: Tensor | None, epoch: int
    ) -> dict[str, Tensor]:
        """The loss terms of a model output that is already computed."""
        return compute_losses(
            out, clean, **self.loss, epoch=epoch, corruption_mask=mask, perceptual=self.perceptual
        )

    def _encoder(self, loss: LossConfig) -> FrozenEncoder:
        """The perceptual term's frozen encoder, on the model's device."""
        if self.own:
            raise DefectaeError(
                f"loss.perceptual_weight = {loss.perceptual_weight}: this model family trains its "
                "own objective, which has no perceptual term; set it to 0"
            )
        encoder = build_backbone(
            loss.perceptual_backbone, loss.perceptual_weights or None, key="loss.perceptual_weights"
        )
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        return encoder.to(next(tensors, torch.empty(0)).device)


def own_losses(
    model: nn.Module, clean: Tensor, inputs: Tensor, mask: Tensor | None
) -> dict[str, Tensor]:
    """The loss terms of a model that trains its own objective: on the clean images, or, for a
    model that learns from synthetic anomalies (draem), on the corrupted ones and their mask."""
    module = devices.unwrap(model)
    if not getattr(module, "learns_from_corruptions", False):
        return module.training_losses(clean)
    if mask is None:
        mask = torch.zeros_like(clean[:, :1])
    return module.training_losses(clean, inputs, mask)


def loss_kwargs(loss: LossConfig) -> dict[str, Any]:
    """The profile's [loss] section as the keyword arguments of `compute_losses`; the perceptual
    encoder itself (built from perceptual_backbone and _weights) is the caller's to pass."""
    kwargs = dataclasses.asdict(loss)
    del kwargs["perceptual_backbone"], kwargs["perceptual_weights"]
    return kwargs


def train_step(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: dict[str, Tensor],
    *,
    epoch: int,
    device: torch.device,
    dtype: torch.dtype | None,
    grad_clip: float = 0.0,
    corrupted: bool = False,
    world: int = 1,
) -> tuple[dict[str, Tensor], float, Tensor]:
    """One optimizer step; returns the detached terms, the global mean loss and the gradient norm.

    A non-finite loss raises FloatingPointError before backward, so no weight sees it.
    """
    clean = batch["clean"].to(device, non_blocking=True)  # (B, C, P, P)
    inputs = batch["input"].to(device, non_blocking=True) if corrupted else clean
    mask = batch["mask"].to(device, non_blocking=True) if corrupted else None
    with devices.autocast(device, dtype):
        terms = objective(clean, inputs, mask, epoch - 1)  # the losses count epochs from 0
    loss = terms["total"].detach().float()
    if world > 1:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(value)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["total"]).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    return {k: v.detach().float() for k, v in terms.items()}, value, norm.detach()


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    loss: LossConfig,
    epoch: int,
    device: torch.device,
    dtype: torch.dtype | None,
    world: int = 1,
    objective: Objective | None = None,
) -> dict[str, float]:
    """Patch-weighted means of every loss term, and of the SSIM index (key "ssim", for models that
    reconstruct pixels), over the validation patches.

    Eval mode, no grad, clean inputs; stochastic terms use a fixed seed so epochs compare fairly.
    `objective`: the training loop's, so a perceptual encoder is not rebuilt every epoch.
    """
    objective = objective if objective is not None else Objective(model, loss)
    sums: dict[str, Tensor] = {}
    model.eval()
    with torch.random.fork_rng(devices=devices.rng_devices(device)):
        torch.manual_seed(0)
        for batch in batches:
            x = batch["clean"].to(device, non_blocking=True)  # (B, C, P, P)
            with devices.autocast(device, dtype):
                out = model(x)
                terms = (
                    own_losses(model, x, x, None)
                    if objective.own
                    else objective.terms(out, x, None, epoch - 1)
                )
            if "map" not in out:  # feature-space models reconstruct no pixels
                recon = out["recon"].float().clamp(0, 1)
                terms["ssim"] = ssim_map(recon, x, window=loss.ssim_window).mean()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().double() * x.shape[0]
            sums["count"] = sums.get("count", 0.0) + torch.tensor(
                float(x.shape[0]), dtype=torch.float64, device=device
            )
    model.train()
    keys = sorted(sums)
    packed = torch.stack(
        [torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys]
    )
    if world > 1:
        dist.all_reduce(packed)
    values = dict(zip(keys, packed.tolist(), strict=True))
    count = values.pop("count")
    return {k: v / count for k, v in values.items()}


def epoch_order(seed: int, epoch: int, steps: int, world: int = 1, rank: int = 0) -> list[int]:
    """The sub-batch indices rank `rank` reads in `epoch`: a seeded shuffle of the global batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [int(b) * world + rank for b in torch.randperm(steps, generator=g)]


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate multiplier at optimizer step `step` (0-based)."""
    warm, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        if cfg.scheduler == "step":
            return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
        return 1.0

    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (L2 weight decay) or AdamW (decoupled weight decay)."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
