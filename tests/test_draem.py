"""The draem family: focal loss by hand, the two sub-networks, its training objective and a small
end-to-end learning check (segmenting a foreign square it never saw)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from defectae.core.losses import focal_loss
from defectae.data.corruptions import corrupt
from defectae.data.synthetic import texture
from defectae.errors import DefectaeError
from defectae.models import build_model
from defectae.profiles import CorruptionConfig, LossConfig
from defectae.training.step import Objective
from defectae.training.tensorboard import image_rows


def small(size: int = 64, channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("draem", channels, size, {"recon_width": 4, "seg_width": 4})


def test_focal_loss_matches_a_hand_computed_case() -> None:
    # pixel 1: class-1 probability 3/4, target 1; pixel 2: class-0 probability 4/5, target 0
    logits = torch.tensor([[[[0.0, math.log(4.0)]], [[math.log(3.0), 0.0]]]])  # (1, 2, 1, 2)
    mask = torch.tensor([[[[1.0, 0.0]]]])
    expected = -(0.25**2 * math.log(0.75) + 0.2**2 * math.log(0.8)) / 2
    assert focal_loss(logits, mask, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_with_gamma_0_is_cross_entropy() -> None:
    logits, mask = torch.randn(2, 2, 5, 5), (torch.rand(2, 1, 5, 5) > 0.7).float()
    ce = F.cross_entropy(logits, mask[:, 0].long())
    assert focal_loss(logits, mask, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-6)


def test_outputs_are_a_reconstruction_logits_and_a_probability_map() -> None:
    model = small(64, 3).eval()
    out = model(torch.rand(2, 3, 64, 64))
    assert out["recon"].shape == (2, 3, 64, 64) and out["logits"].shape == (2, 2, 64, 64)
    assert out["map"].shape == (2, 1, 64, 64)
    assert 0 <= out["map"].min() and out["map"].max() <= 1
    assert torch.allclose(out["map"], out["logits"].softmax(1)[:, 1:])


def test_the_side_must_be_a_multiple_of_32_and_the_widths_positive() -> None:
    with pytest.raises(DefectaeError, match="model.input_size 48: family 'draem'"):
        build_model("draem", 1, 48)
    with pytest.raises(DefectaeError, match="model.args.seg_width 0"):
        build_model("draem", 1, 64, {"seg_width": 0})


def test_the_default_widths_are_the_published_ones() -> None:
    model = build_model("draem", 3, 256)
    assert model.reconstructive.encoder.blocks[0][0].out_channels == 128
    assert model.discriminative.encoder.blocks[0][0].out_channels == 64
    assert model.discriminative.encoder.blocks[-1][0].out_channels == 512


def test_the_objective_trains_on_the_corrupted_input_against_its_mask() -> None:
    model = small()
    objective = Objective(model, LossConfig())
    clean = torch.rand(2, 1, 64, 64)
    corrupted, mask = clean.clone(), torch.zeros(2, 1, 64, 64)
    corrupted[:, :, 8:24, 8:24], mask[:, :, 8:24, 8:24] = 1.0, 1.0
    terms = objective(clean, corrupted, mask, 0)
    assert set(terms) == {"l2", "ssim_term", "focal", "total"}
    expected = model.training_losses(clean, corrupted, mask)
    assert torch.allclose(terms["total"], expected["total"])
    without_mask = model.training_losses(clean, corrupted, torch.zeros_like(mask))
    assert not torch.allclose(terms["focal"], without_mask["focal"])
    terms["total"].backward()
    for part in (model.reconstructive, model.discriminative):
        assert all(p.grad is not None for p in part.parameters())


def test_tensorboard_shows_input_synthetic_mask_reconstruction_and_map() -> None:
    model = small().eval()
    images, masks = torch.rand(3, 1, 64, 64), (torch.rand(3, 1, 64, 64) > 0.5).float()
    rows = image_rows(images, masks, model(images))
    assert len(rows) == 4 and torch.equal(rows[1], masks)
    assert all(r.shape == images.shape for r in rows)


def woven(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 1, size, size) generated woven texture."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([texture("woven", size, rng) for _ in range(n)]))[
        :, None
    ].float()


@pytest.mark.slow
def test_a_few_hundred_steps_segment_a_foreign_square_it_never_saw() -> None:
    torch.manual_seed(0)
    size = 32
    model = build_model("draem", 1, size, {"recon_width": 8, "seg_width": 8})
    train = woven(48, size, seed=1)
    cfg = CorruptionConfig(
        kind="perlin",
        prob=0.5,
        source="mixed",
        perlin_scale=8,
        perlin_min_scale=1,
        perlin_threshold=0.6,
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = train[torch.randint(0, len(train), (16,), generator=g)]
        corrupted, mask = corrupt(batch, cfg, g)
        loss = model.training_losses(batch, corrupted, mask)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    good = woven(16, size, seed=2)
    bad = woven(16, size, seed=3)
    bad[:, :, 12:20, 12:20] = torch.linspace(0.0, 1.0, 8)  # a foreign gradient, never trained on
    model.eval()
    with torch.no_grad():
        scores = [F.avg_pool2d(model(x)["map"], 5, 1, 2).amax(dim=(1, 2, 3)) for x in (good, bad)]
    labels = [0] * 16 + [1] * 16
    assert roc_auc_score(labels, torch.cat(scores).numpy()) >= 0.9
