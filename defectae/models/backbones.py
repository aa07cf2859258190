"""Frozen pretrained encoders for the feature-space families and the perceptual loss.

`build_backbone(name, weights)` returns a `FrozenEncoder`: images in [0, 1] (gray or RGB) in,
a list of ImageNet-normalised feature maps at the backbone's levels out (strides 4, 8, 16 for
the ResNets and EfficientNet-Lite0). Weights:
    efficientnet-lite0  from the optional package of `defectae[pretrained]` (works offline)
    resnet18, wide_resnet50_2, vgg16
                        torchvision's own download into the torch cache on first use
`weights = "PATH"` loads a state dict from a file instead, for machines without internet;
`weights = "none"` skips loading (a checkpoint that holds the encoder is loaded next).
"""

from __future__ import annotations

import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectae import console
from defectae.errors import DefectaeError

NO_WEIGHTS = "none"  # random initialisation, for a model whose checkpoint holds the weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Spec:
    """How to build one backbone and cut it into levels."""

    build: Callable[[], nn.Module]
    levels: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    weights: str = ""  # torchvision's weights enum (its IMAGENET1K_V1); empty: shipped in a package
    trim: Callable[[nn.Module], None] | None = (
        None  # drops layers after the last level, once loaded
    )
    url: str = ""  # where to download the weights, when not the enum's URL


def _resnet_levels(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    f1 = net.layer1(x)
    f2 = net.layer2(f1)
    return [f1, f2, net.layer3(f2)]


def _vgg_levels(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """relu1_2, relu2_2, relu3_3, relu4_3 (the usual perceptual-loss layers)."""
    out, taps = [], (3, 8, 15, 22)
    for i, layer in enumerate(net.features[: taps[-1] + 1]):
        x = layer(x)
        if i in taps:
            out.append(x)
    return out


def _drop_vgg_classifier(net: nn.Module) -> None:
    """VGG-16's classifier is 120 M of its 138 M parameters and never used for features."""
    net.classifier = nn.Identity()


def _lite0_levels(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return net.stages(x)[1:4]


def _torchvision_models() -> Any:
    """torchvision.models, imported on first use: it takes seconds, and most commands never need it."""
    import torchvision.models

    return torchvision.models


def weights_url(spec: Spec) -> str:
    """Where a backbone's ImageNet weights are downloaded from: its url, else torchvision's."""
    return spec.url or getattr(_torchvision_models(), spec.weights).IMAGENET1K_V1.url


def _lite0() -> nn.Module:
    from defectae.models.efficientnet_lite import EfficientNetLite0

    return EfficientNetLite0()


BACKBONES: dict[str, Spec] = {
    "efficientnet-lite0": Spec(_lite0, _lite0_levels, (24, 40, 112), (4, 8, 16)),
    "resnet18": Spec(
        lambda: _torchvision_models().resnet18(),
        _resnet_levels,
        (64, 128, 256),
        (4, 8, 16),
        "ResNet18_Weights",
    ),
    "wide_resnet50_2": Spec(
        lambda: _torchvision_models().wide_resnet50_2(),
        _resnet_levels,
        (256, 512, 1024),
        (4, 8, 16),
        "Wide_ResNet50_2_Weights",
    ),
    "vgg16": Spec(
        lambda: _torchvision_models().vgg16(),
        _vgg_levels,
        (64, 128, 256, 512),
        (1, 2, 4, 8),
        "VGG16_Weights",
        _drop_vgg_classifier,
    ),
}


class FrozenEncoder(nn.Module):
    """images (B, C, H, W) in [0, 1] -> feature maps at `strides`; never trained, always in eval.

    Gray images are repeated to three channels; ImageNet normalisation happens inside, so an
    export carries it. The parameters are buffers in spirit: requires_grad is off.
    """

    def __init__(self, name: str, net: nn.Module) -> None:
        super().__init__()
        spec = BACKBONES[name]
        self.name, self.net, self._levels = name, net, spec.levels
        self.channels, self.strides = spec.channels, spec.strides
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self._levels(self.net, (x - self.mean) / self.std)


def backbone_spec(name: str) -> Spec:
    """The backbone's spec, or a user error listing the known names."""
    if name not in BACKBONES:
        raise DefectaeError(
            f"model.args.backbone '{name}': unknown backbone; expected one of {', '.join(BACKBONES)}"
        )
    return BACKBONES[name]


def build_backbone(
    name: str, weights: str | Path | None = None, key: str = "model.args.weights"
) -> FrozenEncoder:
    """The named backbone with its ImageNet weights (or the state dict at `weights`), frozen.

    `key` is the profile key that names `weights`, for the errors."""
    spec = backbone_spec(name)
    net = spec.build()
    if weights == NO_WEIGHTS:
        path = None
    elif weights:
        path = Path(weights)
    elif name == "efficientnet-lite0":
        from defectae.models.efficientnet_lite import lite0_weights_path

        path = lite0_weights_path(key)
    else:
        path = None
    if weights != NO_WEIGHTS:
        url = "" if path else weights_url(spec)
        state = _read_state(path, key) if path else _download_state(name, url, key)
        load_exactly(net, state, name, f"{key} '{path or url}'")
    if spec.trim is not None:
        spec.trim(net)
    return FrozenEncoder(name, net)


def load_exactly(net: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Load `state` with no missing, unexpected or misshapen key; otherwise one user error
    starting with `source` (the key and file)."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [k for k in own if k in state and getattr(state[k], "shape", None) != own[k].shape]
    problem = (
        f"missing key '{missing[0]}'"
        if missing
        else f"unexpected key '{unexpected[0]}'"
        if unexpected
        else f"key '{misshapen[0]}' has shape {tuple(getattr(state[misshapen[0]], 'shape', ()))}, "
        f"expected {tuple(own[misshapen[0]].shape)}"
        if misshapen
        else ""
    )
    if problem:
        raise DefectaeError(f"{source}: does not fit backbone '{name}'; {problem}")
    net.load_state_dict(state)


def _read_state(path: Path, key: str) -> dict[str, torch.Tensor]:
    where = f"{key} '{path}'"
    if not path.is_file():
        raise DefectaeError(f"{where}: no such file; expected a state dict (.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file: any unpickling error
        raise DefectaeError(f"{where}: not a readable state dict ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise DefectaeError(f"{where}: expected a state dict, found {type(state).__name__}")
    return state


def weights_cache(url: str) -> Path:
    """Where torchvision keeps a downloaded weights file: TORCH_HOME's hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _download_state(name: str, url: str, key: str) -> dict[str, torch.Tensor]:
    cached = weights_cache(url)
    if not cached.is_file():
        console.info(f"downloading the ImageNet weights of {name} to {cached}")
    try:
        return torch.hub.load_state_dict_from_url(
            url, model_dir=str(cached.parent), map_location="cpu", progress=False, check_hash=True
        )
    except (urllib.error.URLError, OSError, RuntimeError) as err:  # RuntimeError: a bad hash
        raise DefectaeError(
            f"backbone '{name}': could not download its ImageNet weights from {url} ({err}); "
            f"without internet, copy that file to {cached} or set {key} = PATH"
        ) from None
