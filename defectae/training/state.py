"""The training state: what the epoch loop changes, and what last.pt holds to continue it exactly."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectae import device as devices
from defectae import profiles
from defectae.errors import DefectaeError
from defectae.models import build_model
from defectae.profiles import Profile, TrainConfig
from defectae.stores.checkpoint import CheckpointState, load_weights
from defectae.training.rng import seed_everything, set_rng_state
from defectae.training.step import lr_factor, make_optimizer


@dataclasses.dataclass
class TrainState:
    """The model and its optimizer, schedule and loss scaler, with the loop's counters."""

    model: nn.Module  # compiled, or the plain module when compile is off or failed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    epoch: int = 0  # completed epochs (the epoch in progress, inside the loop)
    step: int = 0  # optimizer steps
    epoch_step: int = 0  # steps done in epoch `epoch + 1` when a time-limit stop saved mid-epoch
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best
    status: str = "running"  # how the run ended: one of checkpoint.STATUSES
    timing: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one per `train` call

    @classmethod
    def build(
        cls,
        profile: Profile,
        dev: torch.device,
        dtype: torch.dtype | None,
        compile_model: bool,
        steps_per_epoch: int,
        example: torch.Tensor,
    ) -> TrainState:
        """A model initialised from train.seed, compiled on `example` if asked, and its optimizer."""
        cfg = profile.train
        seed_everything(cfg.seed)
        model = build_model(
            profile.model.family,
            profile.dataset.channels,
            profile.model.input_size,
            profile.model.args,
        )
        if getattr(model, "learns_from_corruptions", False) and profile.corruption.kind == "none":
            raise DefectaeError(
                f"corruption.kind 'none': model.family '{profile.model.family}' learns to segment "
                "synthetic anomalies; expected a corruption kind, e.g. 'perlin'"
            )
        model = devices.compile_for_training(model.to(dev), compile_model, example)
        optimizer = make_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
        scaler = torch.amp.GradScaler(dev.type, enabled=devices.needs_grad_scaler(dtype))
        return cls(model, optimizer, scheduler, scaler)

    @property
    def stopped(self) -> bool:
        """Early stopping ended the run."""
        return self.status == "stopped_early"

    @property
    def compiled(self) -> bool:
        """Whether torch.compile wraps the model."""
        return self.model is not devices.unwrap(self.model)

    def restore(self, state: dict[str, Any], path: Path, rank: int, dev: torch.device) -> None:
        """Continue from a loaded last.pt: weights, optimizer, schedule, counters and this rank's RNG."""
        saved = CheckpointState.from_dict(state)
        load_weights(devices.unwrap(self.model), state, path)
        self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        self.scaler.load_state_dict(saved.scaler)
        self.epoch, self.step, self.best_val = saved.epoch, saved.step, saved.best_val
        self.epoch_step, self.timing = saved.epoch_step, list(saved.timing)
        self.best_epoch, self.bad_epochs = saved.best_epoch, saved.bad_epochs
        self.status = saved.status
        # the learning rate is a function of the step: set it from this state's schedule, which
        # is the saved one, or (a run extended to more epochs) the one over the new total
        for group, base, factor in zip(
            self.optimizer.param_groups,
            self.scheduler.base_lrs,
            self.scheduler.lr_lambdas,
            strict=True,
        ):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        set_rng_state(saved.rng[rank if rank < len(saved.rng) else 0], dev)

    def end_epoch(self, val_total: float, cfg: TrainConfig) -> bool:
        """Early-stopping bookkeeping after validation; True when this epoch is the new best."""
        improved = val_total < self.best_val - cfg.min_delta
        if improved:
            self.best_val, self.best_epoch = val_total, self.epoch
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if cfg.patience > 0 and self.bad_epochs >= cfg.patience:
            self.status = "stopped_early"
        elif self.epoch >= cfg.epochs:
            self.status = "finished"
        return improved

    def checkpoint(
        self, profile: Profile, patches: Path, rng: list[dict[str, Any]], world: int
    ) -> CheckpointState:
        """Everything --resume needs, with the RNG state of every rank."""
        return CheckpointState(
            model=devices.unwrap(self.model).state_dict(),
            profile=profiles.to_dict(profile),
            family=profile.model.family,
            in_channels=profile.dataset.channels,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=self.epoch,
            step=self.step,
            epoch_step=self.epoch_step,
            rng=rng,
            best_val=self.best_val,
            best_epoch=self.best_epoch,
            bad_epochs=self.bad_epochs,
            status=self.status,
            patches=str(patches.resolve()),
            data={
                "seed": profile.train.seed,
                "batch_size": profile.train.batch_size,
                "world_size": world,
            },
            timing=self.timing,
        )
