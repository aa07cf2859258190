"""The ae/aee/dae/daee autoencoders, the AITEX VAE series and the spec-string VAE."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defectae import profiles
from defectae.errors import DefectaeError
from defectae.models import build_model, get_family
from defectae.models.specvae import DEFAULT_DECODER, DEFAULT_ENCODER, parse_layers

AE_FAMILIES = ["ae", "aee", "dae", "daee"]
VAE_FAMILIES = ["vae1", "vae2", "vae3", "vae4", "vae5", "vae6", "vae8", "specvae"]
FAMILIES = AE_FAMILIES + VAE_FAMILIES
SMALLEST = 16  # every family here downsamples by 16 at its defaults


def from_profile(name: str, channels: int, size: int) -> nn.Module:
    """Build a family from its shipped default profile, at a test size."""
    p = profiles.resolve(f"synthetic-{name}")
    assert p.model.family == name
    return build_model(p.model.family, channels, size, p.model.args)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", FAMILIES)
def test_one_training_step_and_shapes(name: str, channels: int) -> None:
    torch.manual_seed(0)
    size = 32 if name in AE_FAMILIES else SMALLEST
    model = from_profile(name, channels, size).train()
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out["recon"].shape == x.shape
    assert 0.0 <= out["recon"].min() and out["recon"].max() <= 1.0
    if name == "specvae":
        assert out["mu"].shape == (2, 4, 1, 1)  # half of the encoder's 8 channels, side / 16
    elif get_family(name).is_vae:
        assert out["mu"].shape == (2, 32)
    else:
        assert out["z"].shape == (2, 100)
    if "mu" in out:
        assert out["logvar"].shape == out["z"].shape == out["mu"].shape
    loss = nn.functional.mse_loss(out["recon"], x)
    if "mu" in out:
        loss = loss + 1e-3 * (out["mu"].pow(2) + out["logvar"].exp() - out["logvar"] - 1).mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    loss.backward()
    params = list(model.parameters())
    first = params[0].detach().clone()
    opt.step()
    assert torch.isfinite(loss)
    for p in params:  # every parameter takes part in the step
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert not torch.equal(first, params[0])


# The published layer table (Bergmann et al. 2018) for a 128x128 input: (channels, side) of every
# conv's output, encoder then decoder.
AE_TABLE = [
    (32, 64), (32, 32), (32, 32), (64, 16), (64, 16), (128, 8), (64, 8), (32, 8), (100, 1),
    (32, 8), (64, 8), (128, 8), (64, 16), (64, 16), (32, 32), (32, 32), (32, 64), (1, 128),
]  # fmt: skip


def test_ae_layer_shapes_match_the_published_table() -> None:
    model = build_model("ae", 1, 128, {"latent_dim": 100}).eval()
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    shapes: list[tuple[int, int]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: shapes.append((o.shape[1], o.shape[2])))
        for m in convs
    ]
    with torch.no_grad():
        model(torch.rand(1, 1, 128, 128))
    for h in hooks:
        h.remove()
    assert shapes == AE_TABLE
    kernels = [(m.kernel_size[0], m.stride[0]) for m in convs[:9]]
    assert kernels == [(4, 2), (4, 2), (3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (3, 1), (8, 1)]
    latent_up = model.decoder[0]
    assert isinstance(latent_up, nn.ConvTranspose2d) and latent_up.kernel_size == (8, 8)
    assert isinstance(model.decoder[-1], nn.Sigmoid)
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 16 and all(a.negative_slope == 0.2 for a in acts)


def test_latent_kernel_adapts_to_the_patch_size() -> None:
    model = build_model("ae", 1, 64, {"latent_dim": 500})
    assert model.encoder[-1].kernel_size == (4, 4)
    assert model(torch.rand(1, 1, 64, 64))["z"].shape == (1, 500)


def test_aee_has_three_convs_per_stage_and_a_256_channel_stage() -> None:
    model = build_model("aee", 1, 128, {})
    convs = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32] * 3 + [64] * 3 + [128] * 3 + [256] * 3 + [100]
    assert sum(c.stride[0] == 2 for c in convs) == 4
    assert model(torch.rand(1, 1, 128, 128))["recon"].shape == (1, 1, 128, 128)


@pytest.mark.parametrize(
    ("family", "size", "args"),
    [
        ("ae", 100, {}),
        ("daee", 120, {}),
        ("vae1", 100, {}),
        ("vae8", 8, {}),
        ("vae2", 48, {"encoder_channels": [8, 16, 32, 64, 64]}),
        ("specvae", 100, {}),
    ],
)
def test_bad_input_size_names_model_input_size(family: str, size: int, args: dict) -> None:
    with pytest.raises(DefectaeError, match=f"model.input_size {size}"):
        build_model(family, 1, size, args)


@pytest.mark.parametrize(
    ("family", "args", "key"),
    [
        ("ae", {"latent_dim": 0}, "model.args.latent_dim"),
        ("vae4", {"attention": "cbam"}, "model.args.attention"),
        ("vae1", {"dropout": 1.5}, "model.args.dropout"),
        ("vae2", {"decoder_channels": []}, "model.args.decoder_channels"),
        ("vae2", {"encoder_channels": [32, "x"]}, "model.args.encoder_channels"),
    ],
)
def test_bad_arguments_are_user_errors(family: str, args: dict, key: str) -> None:
    with pytest.raises(DefectaeError, match=key):
        build_model(family, 1, 256, args)


def test_vae_eval_is_deterministic_and_train_samples() -> None:
    torch.manual_seed(0)
    model = build_model("vae8", 1, 32, {"attention": "se"})
    x = torch.rand(2, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a["recon"], b["recon"]) and torch.equal(a["z"], a["mu"])
    model.train()
    with torch.no_grad():
        out = model(x)
    assert not torch.equal(out["z"], out["mu"])


@pytest.mark.parametrize("attention", ["se", "self"])
def test_vae_attention_options(attention: str) -> None:
    model = build_model("vae4", 3, 32, {"attention": attention}).eval()
    assert model(torch.rand(2, 3, 32, 32))["recon"].shape == (2, 3, 32, 32)


def test_vae2_channel_lists_set_the_layers() -> None:
    model = build_model(
        "vae2", 1, 32, {"encoder_channels": [8, 16, 32], "decoder_channels": [16, 8, 4]}
    )
    assert [s[0].out_channels for s in model.encoder] == [8, 16, 32]
    assert [(u.out_channels, u.stride[0]) for u in model.ups] == [(8, 2), (4, 2), (1, 2)]
    assert model.eval()(torch.rand(1, 1, 32, 32))["recon"].shape == (1, 1, 32, 32)


def test_skip_variants_merge_at_every_resolution() -> None:
    for family, kind in [("vae4", None), ("vae5", "add"), ("vae6", "concat"), ("vae8", "gate")]:
        model = build_model(family, 1, 32, {})
        modes = [m.mode for m in model.merges]
        assert modes == ([] if kind is None else [kind] * 4)
        assert model.bottleneck[1].num_features == 1024  # fc + BatchNorm1d before mu / logvar
        assert model.expand[1].unflattened_size == (256, 2, 2)
        assert len(model.ups) == 4


def test_denoising_profiles_train_on_dominant_squares() -> None:
    for name in ("dae", "daee"):
        p = profiles.resolve(f"texture1-{name}")  # the model profile alone (no pair file)
        assert p.corruption.kind == "dominant_square" and p.corruption.size == 20
        assert p.loss.corruption_weight > 1
    assert profiles.resolve("synthetic-ae").corruption.kind == "none"


def test_whole_image_vae_profiles_match_the_dataset() -> None:
    for name in VAE_FAMILIES:
        p = profiles.resolve(f"synthetic-{name}")
        assert p.augment.whole_image and p.model.input_size == p.dataset.image_size[0]
        assert p.loss.kld_weight > 0


# ----------------------------------------------------------------------------- specvae


def test_specvae_profile_ships_the_reference_lists() -> None:
    args = profiles.resolve("synthetic-specvae").model.args
    assert tuple(args["encoder"]) == DEFAULT_ENCODER and tuple(args["decoder"]) == DEFAULT_DECODER
    enc = parse_layers(DEFAULT_ENCODER, "model.args.encoder")
    dec = parse_layers(DEFAULT_DECODER, "model.args.decoder")
    assert len(enc) == 16 and len(dec) == 21  # N* repeats expanded
    assert [s.kind for s in enc[:3]] == ["C2d", "VAERB", "VAERB"]
    assert enc[-1].params == (8, 8, 1, 1, 0) and dec[0].params == (4, 4, 1, 1, 0)


def _with(lst: tuple[str, ...], i: int, entry: str) -> list[str]:
    out = list(lst)
    out[i] = entry
    return out


@pytest.mark.parametrize(
    ("key", "entries", "message"),
    [
        ("encoder", _with(DEFAULT_ENCODER, 3, "C2d_64_x_3_1_1"),
         r"model\.args\.encoder\[3\] 'C2d_64_x_3_1_1': expected C2d_in_out_k_s_p with integers"),
        ("encoder", _with(DEFAULT_ENCODER, 2, "Conv_128_128"), r"model\.args\.encoder\[2\] 'Conv_128_128'"),
        ("decoder", _with(DEFAULT_DECODER, 4, "4*VAERB_512"),
         r"model\.args\.decoder\[4\] '4\*VAERB_512': expected VAERB_in_out"),
        ("encoder", _with(DEFAULT_ENCODER, 3, "VAERB_64_256"),
         r"model\.args\.encoder\[3\] 'VAERB_64_256': expects 64 input channels but the previous layer gives 128"),
        ("encoder", _with(DEFAULT_ENCODER, 12, "C2d_8_7_1_1_0"), r"model\.args\.encoder\[12\].*even channel count"),
        ("decoder", _with(DEFAULT_DECODER, 0, "C2d_8_4_1_1_0"), r"model\.args\.decoder\[0\].*latent has 4"),
        ("encoder", _with(DEFAULT_ENCODER, 0, "C2d_64_128_3_1_1"), r"model\.args\.encoder\[0\].*image channel"),
        ("encoder", _with(DEFAULT_ENCODER, 9, "GN_3_256"), r"model\.args\.encoder\[9\] 'GN_3_256'"),
        ("encoder", "C2d_3_8_3_1_1", r"model\.args\.encoder: expected a non-empty list"),
    ],
)  # fmt: skip
def test_specvae_rejects_bad_strings_with_their_position(
    key: str, entries: object, message: str
) -> None:
    with pytest.raises(DefectaeError, match=message):
        build_model("specvae", 1, 256, {key: entries})


def test_specvae_size_error_suggests_sizes_that_work() -> None:
    with pytest.raises(
        DefectaeError, match=r"model\.input_size 40: .*sizes that round-trip: 16, 32, 48"
    ):
        build_model("specvae", 1, 40, {})


# ----------------------------------------------------------------------------- compile / export


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_and_traced_outputs_match_eager(name: str) -> None:
    """One graph per family (no data-dependent breaks), numerically equal to eager; also traceable.

    The AOT backend runs dynamo capture and AOTAutograd without inductor's C++ build, which
    takes minutes on a loaded CPU; the slow test below runs inductor itself.
    """
    torch.manual_seed(0)
    model = from_profile(name, 1, SMALLEST).eval()
    x = torch.rand(2, 1, SMALLEST, SMALLEST)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        traced = torch.jit.trace(model, x, strict=False, check_trace=False)(x)
    torch._dynamo.reset()
    assert eager.keys() == compiled.keys() == traced.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(traced[key], eager[key], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_vae_matches_eager() -> None:
    torch.manual_seed(0)
    model = from_profile("vae8", 1, SMALLEST).eval()
    x = torch.rand(2, 1, SMALLEST, SMALLEST)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch._dynamo.reset()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-4, rtol=1e-4)
