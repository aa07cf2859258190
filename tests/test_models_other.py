"""cnnae, resnetae, vitae and diffae: build from their default profiles, train, compile, specifics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18, resnet34

from defectae import profiles
from defectae.errors import DefectaeError
from defectae.models import build_model

# Small overrides on top of each default profile so a CPU step takes well under a second.
SMALL: dict[str, tuple[int, dict]] = {
    "cnnae": (32, {"base_channels": 8, "latent_dim": 16}),
    "resnetae": (32, {"latent_dim": 32}),
    "vitae": (
        32,
        {
            "patch_size": 8,
            "depth": 2,
            "embed_dim": 64,
            "latent_dim": 16,
            "decoder_dim": 32,
            "decoder_depth": 1,
        },
    ),
    "diffae": (
        16,
        {
            "base_channels": 16,
            "channel_mults": [1, 2],
            "blocks_per_level": 1,
            "timesteps": 100,
            "t0": 20,
            "ddim_steps": 2,
        },
    ),
}
# Every family on 1 and 3 channels, and its non-default options once each.
VARIANTS = [(family, {}, c) for family in SMALL for c in (1, 3)] + [
    ("cnnae", {"skips": True, "bottleneck": "conv", "output": "tanh"}, 3),
    ("resnetae", {"depth": 34, "bottleneck": "conv"}, 1),
    ("vitae", {"decoder": "cnn"}, 3),
    ("diffae", {"schedule": "cosine"}, 1),
]


def small_model(family: str, channels: int, **extra) -> tuple[torch.nn.Module, int]:
    """The family built from its shipped default profile, shrunk by SMALL and `extra`."""
    profile = profiles.resolve(f"synthetic-{family}")
    assert profile.model.family == family
    size, small = SMALL[family]
    args = {**profile.model.args, **small, **extra}
    return build_model(family, channels, size, args), size


def train_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "training_losses"):
        losses = model.training_losses(x)
        assert set(losses) >= {"total", "noise_mse"}
        return losses["total"]
    return F.mse_loss(model(x)["recon"], x)


@pytest.mark.parametrize(("family", "extra", "channels"), VARIANTS)
def test_trains_one_step_and_returns_documented_shapes(family, extra, channels):
    torch.manual_seed(0)
    model, size = small_model(family, channels, **extra)
    x = torch.rand(2, channels, size, size)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loss = train_loss(model, x)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert changed > len(before) // 2

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out["recon"].shape == x.shape
    assert out["recon"].min() >= 0 and out["recon"].max() <= 1
    assert ("z" in out) == (family != "diffae")


def compiled_vs_eager(family: str, backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, size = small_model(family, 1)
    model.eval()
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        eager = model(x)["recon"]
        # fullgraph: a graph break (data-dependent Python control flow, .item()) fails the test
        compiled = torch.compile(model, backend=backend, fullgraph=True)(x)["recon"]
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(SMALL))
def test_compiles_as_one_graph_matching_eager(family):
    # aot_eager traces through dynamo and AOTAutograd like inductor does, without the C++
    # code generation that costs ~30 s of CPU per model on a cold cache.
    compiled_vs_eager(family, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vitae", "diffae"])
def test_inductor_matches_eager(family):
    # The two families with hand-written attention / sampling arithmetic, through the real backend.
    compiled_vs_eager(family, "inductor")


def test_cnnae_tanh_output_is_mapped_to_unit_range():
    torch.manual_seed(0)
    model, size = small_model("cnnae", 1, output="tanh")
    model.eval()
    with torch.no_grad():
        model.head.bias.fill_(-3.0)  # tanh(-3) = -0.995: unmapped, the output would be negative
        recon = model(torch.rand(1, 1, size, size))["recon"]
    assert 0 <= recon.min() < 0.05


@pytest.mark.parametrize("bottleneck", ["fc", "conv"])
def test_cnnae_skips_bypass_the_bottleneck(bottleneck):
    # Cut the bottleneck: without skips the output no longer depends on the input;
    # with skips the input still reaches the output, which is why skips copy defects through.
    torch.manual_seed(0)
    x1, x2 = torch.rand(2, 1, 1, 32, 32)
    diffs = {}
    for skips in (False, True):
        model, _ = small_model("cnnae", 1, skips=skips, bottleneck=bottleneck)
        model.eval()
        with torch.no_grad():
            model.from_latent[0].weight.zero_()
            diffs[skips] = (model(x1)["recon"] - model(x2)["recon"]).abs().max().item()
    assert diffs[False] == 0.0
    assert diffs[True] > 1e-4


@pytest.mark.parametrize("channels", [1, 3])
def test_resnetae_loads_local_torchvision_weights(tmp_path, channels):
    torch.manual_seed(0)
    reference = resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pt"
    torch.save(reference, path)
    model, _ = small_model("resnetae", channels, weights=str(path))
    enc = model.encoder.state_dict()
    expected_conv1 = reference["conv1.weight"]
    if channels == 1:
        expected_conv1 = expected_conv1.mean(1, keepdim=True)
    torch.testing.assert_close(enc["conv1.weight"], expected_conv1)
    torch.testing.assert_close(enc["layer4.1.conv2.weight"], reference["layer4.1.conv2.weight"])
    torch.testing.assert_close(
        enc["layer2.0.downsample.1.running_var"], reference["layer2.0.downsample.1.running_var"]
    )


def test_resnetae_bad_weights_are_user_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(DefectaeError, match="nope.pt.*not found"):
        small_model("resnetae", 1, weights=str(missing))

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(DefectaeError, match="notes.pt"):
        small_model("resnetae", 1, weights=str(text))

    deeper = tmp_path / "resnet34.pt"
    torch.save(resnet34(weights=None).state_dict(), deeper)
    with pytest.raises(DefectaeError, match="resnet34.pt.*resnet18"):
        small_model("resnetae", 1, weights=str(deeper))
    small_model("resnetae", 1, weights=str(deeper), depth=34)  # the matching depth loads


def test_diffae_reconstruction_is_deterministic_per_seed():
    torch.manual_seed(0)
    model, size = small_model("diffae", 1, seed=7)
    other, _ = small_model("diffae", 1, seed=8)
    other.load_state_dict(model.state_dict())
    model.eval()
    other.eval()
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        a, b = model(x)["recon"], model(x)["recon"]
        alone = model(x[1:2])["recon"]
        c = other(x)["recon"]
    assert torch.equal(a, b)
    torch.testing.assert_close(alone, a[1:2], atol=1e-5, rtol=1e-5)  # independent of batch position
    assert (a - c).abs().max() > 1e-3


def test_diffae_training_loss_is_the_noise_mse():
    # With a U-Net that predicts zero noise, the loss is the mean square of the drawn noise (~1).
    torch.manual_seed(0)
    model, size = small_model("diffae", 1)
    with torch.no_grad():
        model.unet.out[-1].weight.zero_()
        model.unet.out[-1].bias.zero_()
    losses = model.training_losses(torch.rand(8, 1, size, size))
    assert losses["total"] is losses["noise_mse"]
    assert 0.9 < losses["total"].item() < 1.1


@pytest.mark.parametrize(
    ("family", "size", "extra", "expected"),
    [
        ("cnnae", 40, {}, "multiple of 16"),
        ("resnetae", 48, {}, "multiple of 32"),
        ("vitae", 36, {}, "multiple of 8"),
        ("diffae", 30, {"channel_mults": [1, 2, 4]}, "multiple of 4"),
    ],
)
def test_bad_input_size_is_a_user_error(family, size, extra, expected):
    profile = profiles.resolve(f"synthetic-{family}")
    args = {**profile.model.args, **SMALL[family][1], **extra}
    with pytest.raises(DefectaeError, match=f"model.input_size {size}: .*{expected}"):
        build_model(family, 1, size, args)


@pytest.mark.parametrize(
    ("family", "extra", "key"),
    [
        ("cnnae", {"output": "relu"}, "model.args.output"),
        ("resnetae", {"depth": 50}, "model.args.depth"),
        ("vitae", {"heads": 5}, "model.args.embed_dim"),
        ("vitae", {"decoder": "mlp"}, "model.args.decoder"),
        ("diffae", {"t0": 100}, "model.args.t0"),
        ("diffae", {"schedule": "sqrt"}, "model.args.schedule"),
    ],
)
def test_bad_arguments_name_the_key(family, extra, key):
    with pytest.raises(DefectaeError, match=key):
        small_model(family, 1, **extra)
