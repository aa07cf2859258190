"""The perceptual loss term: its value, its gradients, the profile keys and the training objective."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from defectae import profiles
from defectae.core.losses import compute_losses, perceptual_loss
from defectae.errors import DefectaeError
from defectae.models import build_model
from defectae.models.backbones import BACKBONES, FrozenEncoder, build_backbone
from defectae.profiles.schema import LossConfig
from defectae.training.state import TrainState
from defectae.training.step import Objective, loss_kwargs, train_step, validate

SETS = [
    "model.input_size=32",
    "model.args.latent_dim=16",
    "loss.recon=mse",
    "loss.perceptual_weight=0.5",
    "train.amp=off",
    "train.compile=false",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The encoder runs faster on one thread (and does not spin-wait on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder() -> FrozenEncoder:
    return build_backbone("efficientnet-lite0")


def _pair(channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, channels, 32, 32, generator=g)
    return x, (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def test_perceptual_loss_is_the_mean_over_levels_of_each_levels_mse() -> None:
    a = [torch.tensor([1.0, 2.0]).view(1, 2, 1, 1), torch.ones(1, 1, 2, 2)]
    b = [torch.zeros(1, 2, 1, 1), torch.full((1, 1, 2, 2), 3.0)]
    # level 1: (1 + 4) / 2 = 2.5; level 2: 4 * 2^2 / 4 = 4
    assert perceptual_loss(a, b).item() == pytest.approx((2.5 + 4.0) / 2)
    assert perceptual_loss(a, a).item() == 0.0


@pytest.mark.parametrize("channels", [1, 3])
def test_the_term_adds_to_the_total_and_trains_the_prediction_only(
    encoder: FrozenEncoder, channels: int
) -> None:
    x, y = _pair(channels)
    pred, target = y.clone().requires_grad_(), x.clone().requires_grad_()
    terms = compute_losses({"recon": pred}, target, perceptual=encoder, perceptual_weight=0.5)
    assert torch.equal(terms["total"], terms["recon"] + 0.5 * terms["perceptual"])
    assert terms["perceptual"].item() > 0
    assert compute_losses({"recon": x}, x, perceptual=encoder, perceptual_weight=0.5)[
        "perceptual"
    ].item() == pytest.approx(0.0, abs=1e-10)
    terms["perceptual"].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None  # the target's features are a constant
    assert all(p.grad is None for p in encoder.parameters())


def test_the_term_is_off_by_default_and_needs_an_encoder_when_on(encoder: FrozenEncoder) -> None:
    x, y = _pair()
    assert "perceptual" not in compute_losses({"recon": y}, x, perceptual=encoder)
    with pytest.raises(DefectaeError, match="loss.perceptual_weight"):
        compute_losses({"recon": y}, x, perceptual_weight=1.0)


def test_the_term_stays_close_to_float32_under_bf16_autocast(encoder: FrozenEncoder) -> None:
    x, y = _pair()
    plain = compute_losses({"recon": y}, x, perceptual=encoder, perceptual_weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = compute_losses({"recon": y}, x, perceptual=encoder, perceptual_weight=1.0)
    assert mixed["perceptual"].dtype == torch.float32
    assert mixed["perceptual"].item() == pytest.approx(plain["perceptual"].item(), rel=0.1)


def test_a_profile_trains_with_the_term_and_checkpoints_the_model_only() -> None:
    profile = profiles.resolve("synthetic-ae", SETS)
    cpu = torch.device("cpu")
    x = torch.rand(4, 1, 32, 32)
    state = TrainState.build(profile, cpu, None, False, 1, x)
    objective = Objective(state.model, profile.loss)
    objective.train()
    assert objective.perceptual is not None and not objective.perceptual.net.training
    batch = {"clean": x, "input": x}
    terms, value, _ = train_step(
        objective, state.optimizer, state.scaler, batch, epoch=1, device=cpu, dtype=None
    )
    assert "perceptual" in terms and value == pytest.approx(terms["total"].item())
    assert "perceptual" in validate(state.model, [batch], profile.loss, 1, cpu, None)
    trained = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in state.model.parameters()}
    saved = state.checkpoint(profile, Path("patches.h5"), [{}], 1).model
    plain = build_model("ae", 1, 32, profile.model.args).state_dict()
    assert saved.keys() == plain.keys()


def test_backbone_names_are_the_registrys_and_a_bad_one_is_a_one_line_error() -> None:
    hint = typing.get_type_hints(LossConfig)["perceptual_backbone"]
    assert typing.get_args(hint) == tuple(BACKBONES)
    with pytest.raises(DefectaeError) as err:
        profiles.resolve("synthetic-ae", ["loss.perceptual_backbone=vgg19"])
    assert "loss.perceptual_backbone" in str(err.value) and "\n" not in str(err.value)
    assert "perceptual_backbone" not in loss_kwargs(LossConfig())


def test_a_missing_weights_file_names_the_loss_key(tmp_path: Path) -> None:
    loss = LossConfig(perceptual_weight=1.0, perceptual_weights=str(tmp_path / "none.pth"))
    with pytest.raises(DefectaeError, match="loss.perceptual_weights"):
        Objective(nn.Conv2d(1, 1, 1), loss)


def test_a_family_with_its_own_objective_refuses_the_term() -> None:
    class OwnObjective(nn.Conv2d):
        def training_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"total": x.mean()}

    with pytest.raises(DefectaeError, match="loss.perceptual_weight"):
        Objective(OwnObjective(1, 1, 1), LossConfig(perceptual_weight=1.0))
