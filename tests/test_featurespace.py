"""Feature-space families (rd, dfr) and their frozen backbones: shapes, maps, weights, downloads."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

from defectae.core.inspector import Inspector
from defectae.errors import DefectaeError
from defectae.models import backbones, build_model
from defectae.models.backbones import BACKBONES, FrozenEncoder, build_backbone
from defectae.models.featurespace import cosine_distance, upsampled_sum


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18", "wide_resnet50_2", "vgg16"])
def test_each_backbone_gives_its_levels_at_their_strides_for_gray_and_rgb(name):
    spec = BACKBONES[name]
    encoder = FrozenEncoder(name, spec.build())
    for channels in (1, 3):
        feats = encoder(torch.rand(2, channels, 64, 96))
        assert [f.shape[1] for f in feats] == list(spec.channels)
        assert [tuple(f.shape[-2:]) for f in feats] == [(64 // s, 96 // s) for s in spec.strides]
    assert not any(p.requires_grad for p in encoder.parameters())


def test_a_frozen_encoder_stays_in_eval_mode_when_its_model_trains():
    model = build_model("rd", 1, 64)
    model.train()
    assert model.training and not model.encoder.training and not model.encoder.net.training
    x = torch.rand(2, 1, 64, 64)
    before = model.encoder(x)[0].clone()
    model.training_losses(x)["total"].backward()
    assert torch.equal(model.encoder(x)[0], before)  # BatchNorm statistics untouched
    assert all(p.grad is None for p in model.encoder.parameters())


def test_cosine_distance_is_zero_for_identical_features_and_within_0_and_2():
    a = torch.randn(3, 16, 5, 7)
    assert cosine_distance(a, a).abs().max() < 1e-5
    assert torch.allclose(cosine_distance(a, -a), torch.full((3, 1, 5, 7), 2.0), atol=1e-5)
    d = cosine_distance(a, torch.randn(3, 16, 5, 7))
    assert d.shape == (3, 1, 5, 7) and d.min() >= 0 and d.max() <= 2


def test_upsampled_sum_adds_the_levels_at_the_image_size():
    maps = [torch.ones(1, 1, 4, 4), torch.full((1, 1, 2, 2), 2.0)]
    assert torch.allclose(upsampled_sum(maps, (8, 8)), torch.full((1, 1, 8, 8), 3.0))


@pytest.mark.parametrize("family", ["rd", "dfr"])
def test_feature_models_return_the_input_and_a_nonnegative_map_at_its_size(family):
    model = build_model(family, 1, 64).eval()
    x = torch.rand(2, 1, 64, 64)
    out = model(x)
    assert torch.equal(out["recon"], x)
    assert out["map"].shape == (2, 1, 64, 64) and out["map"].min() >= 0
    terms = model.training_losses(x)
    assert terms["total"].requires_grad and torch.isfinite(terms["total"])


@pytest.mark.parametrize("family", ["rd", "dfr"])
def test_the_inspector_scores_the_models_own_map_whole_or_tiled(family):
    model = build_model(family, 1, 64).eval()
    x = torch.rand(1, 1, 64, 64)
    whole = Inspector(model, patch_size=64, stride=64, whole_image=True)
    residual, score, recon = whole(x)
    assert torch.allclose(residual, model(x)["map"], atol=1e-6)
    assert torch.equal(recon, x) and torch.allclose(score, residual.amax((1, 2, 3)))
    tiled = Inspector(model, patch_size=64, stride=32, border_pad=0)
    assert torch.allclose(tiled(x)[0], residual, atol=1e-6)  # one tile covers the image
    bigger = whole(torch.rand(1, 1, 96, 80))[0]
    assert bigger.shape == (1, 1, 96, 80)


def test_bench_measures_the_share_of_inference_time_in_the_frozen_encoder():
    from defectae.bench.figures import encoder_share
    from defectae.commands.bench import QUICK

    x = torch.rand(2, 1, 64, 64)
    share = encoder_share(build_model("dfr", 1, 64), x, QUICK, torch.device("cpu"))
    assert 0.0 < share <= 1.0


def test_unknown_backbone_and_bad_sizes_are_user_errors():
    with pytest.raises(DefectaeError, match=r"model.args.backbone 'resnet-18'.*expected one of"):
        build_model("rd", 1, 64, {"backbone": "resnet-18"})
    with pytest.raises(DefectaeError, match=r"model.input_size 48"):
        build_model("rd", 1, 48)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    """A resnet18 state dict (random weights) named as torchvision names its files: NAME-SHA8.pth."""
    folder = tmp_path_factory.mktemp("weights")
    raw = folder / "raw.pth"
    torch.manual_seed(0)
    torch.save(BACKBONES["resnet18"].build().state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()[:8]
    return raw.rename(folder / f"resnet18-{digest}.pth")


def test_weights_from_a_path_load_exactly_and_misfits_name_the_first_missing_key(
    resnet18_file, tmp_path
):
    encoder = build_backbone("resnet18", resnet18_file)
    state = torch.load(resnet18_file, weights_only=True)
    assert torch.equal(encoder.net.conv1.weight, state["conv1.weight"])
    del state["layer2.0.bn1.weight"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(
        DefectaeError, match=r"does not fit backbone 'resnet18'; missing key 'layer2.0.bn1.weight'"
    ):
        build_backbone("resnet18", tmp_path / "cut.pth")
    with pytest.raises(DefectaeError, match=r"no such file"):
        build_backbone("resnet18", tmp_path / "absent.pth")


@pytest.fixture
def loopback(resnet18_file, tmp_path, monkeypatch):
    """torchvision's download of resnet18 pointed at a local HTTP server; TORCH_HOME in tmp."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(resnet18_file, served / resnet18_file.name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/{resnet18_file.name}"
    spec = BACKBONES["resnet18"]
    monkeypatch.setitem(BACKBONES, "resnet18", spec.__class__(**{**spec.__dict__, "url": url}))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    yield server, url
    server.shutdown()
    server.server_close()


def test_a_first_use_downloads_into_the_torch_cache_then_works_offline(loopback, capsys):
    server, url = loopback
    encoder = build_backbone("resnet18")
    cached = backbones.weights_cache(url)
    assert cached.is_file() and str(cached) in capsys.readouterr().err
    server.shutdown()
    again = build_backbone("resnet18")  # from the cache, no server
    assert torch.equal(again.net.fc.weight, encoder.net.fc.weight)


def test_a_download_without_internet_says_how_to_provide_the_weights(loopback):
    server, url = loopback
    server.shutdown()
    server.server_close()
    with pytest.raises(DefectaeError) as err:
        build_backbone("resnet18")
    message = str(err.value)
    assert "could not download" in message and "model.args.weights = PATH" in message
    assert str(backbones.weights_cache(url)) in message and "\n" not in message


def test_a_checkpoint_loads_without_reading_or_downloading_pretrained_weights(
    tmp_path, monkeypatch
):
    from builders import untrained_checkpoint

    from defectae import profiles
    from defectae.stores.checkpoint import load_model

    sets = ["model.input_size=64", "model.args.backbone=resnet18"]
    profile = profiles.resolve("synthetic-rd", sets=sets)
    torch.manual_seed(1)
    downloaded = BACKBONES["resnet18"].build().state_dict()  # stands in for ImageNet weights
    monkeypatch.setattr(backbones, "_download_state", lambda *a: downloaded)
    ckpt = untrained_checkpoint(tmp_path, profile)

    def offline(*args):
        raise AssertionError("loading a checkpoint must not fetch weights")

    monkeypatch.setattr(backbones, "_download_state", offline)
    model, _, _ = load_model(ckpt, expect=profile)
    assert torch.equal(model.encoder.net.conv1.weight, downloaded["conv1.weight"])


def test_torchvision_backbones_name_torchvisions_weights_and_vgg_drops_its_classifier():
    import torchvision.models as tvm

    from defectae.models.backbones import BACKBONES, weights_url

    assert weights_url(BACKBONES["resnet18"]) == tvm.ResNet18_Weights.IMAGENET1K_V1.url
    assert weights_url(BACKBONES["vgg16"]) == tvm.VGG16_Weights.IMAGENET1K_V1.url
    assert BACKBONES["vgg16"].trim is not None and BACKBONES["vgg16"].url == ""
