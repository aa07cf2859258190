"""`resnetae`: a ResNet-18/34 encoder, a 1024-d bottleneck and an upsampling residual decoder.

The encoder is laid out exactly like torchvision's ResNet (conv1, bn1, layer1..layer4 from
`BasicBlock`), so a torchvision-style state dict given as `weights = "PATH"` loads into it
directly. That local file is the only file a model reads; nothing is ever downloaded.
Inputs in [0, 1] are normalised with the ImageNet mean and std (their average for one
channel), which pretrained stems expect and from-scratch training does not mind.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from defectae.errors import DefectaeError
from defectae.models.blocks import require_multiple, require_positive_int
from defectae.models.registry import register

DIVISOR = 32  # stem stride 2, max-pool 2, then layer2..layer4 stride 2 each
LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
WIDTHS = (64, 128, 256, 512)
DECODER_WIDTHS = (256, 128, 64, 64, 32)  # one per 2x upsampling, /32 -> /1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A torchvision ResNet stage: the first block may downsample through a 1x1 shortcut."""
    from torchvision.models.resnet import BasicBlock  # torchvision takes seconds to import

    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
        )
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetEncoder(nn.Module):
    """torchvision's ResNet trunk without avgpool/fc; state-dict keys match resnet18/34."""

    def __init__(self, in_channels: int, depth: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip(WIDTHS, LAYERS[depth], strict=True)):
            setattr(self, f"layer{i + 1}", _stage(inplanes, planes, blocks, 1 if i == 0 else 2))
            inplanes = planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, H/32, W/32)


def _up_block(cin: int, cout: int) -> nn.Sequential:
    """2x nearest upsampling, a 3x3 conv to `cout`, then one residual BasicBlock."""
    from torchvision.models.resnet import BasicBlock

    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        BasicBlock(cout, cout),
    )


class ResNetAE(nn.Module):
    def __init__(
        self,
        in_channels: int,
        input_size: int,
        depth: int,
        latent_dim: int,
        bottleneck: str,
    ) -> None:
        super().__init__()
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        if in_channels == 1:
            mean, std = mean.mean(1, keepdim=True), std.mean(1, keepdim=True)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.encoder = ResNetEncoder(in_channels, depth)

        side, top = input_size // DIVISOR, WIDTHS[-1]
        if bottleneck == "fc":
            self.to_latent = nn.Sequential(nn.Flatten(), nn.Linear(top * side * side, latent_dim))
            self.from_latent = nn.Sequential(
                nn.Linear(latent_dim, top * side * side),
                nn.Unflatten(1, (top, side, side)),
                nn.ReLU(inplace=True),
            )
        else:  # a spatial latent: (B, latent_dim, H/32, W/32); works at any multiple of 32
            self.to_latent = nn.Conv2d(top, latent_dim, 1)
            self.from_latent = nn.Sequential(nn.Conv2d(latent_dim, top, 1), nn.ReLU(inplace=True))

        blocks, cin = [], top
        for cout in DECODER_WIDTHS:
            blocks.append(_up_block(cin, cout))
            cin = cout
        self.decoder = nn.Sequential(*blocks)
        self.head = nn.Conv2d(cin, in_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.to_latent(self.encoder((x - self.mean) / self.std))
        recon = torch.sigmoid(self.head(self.decoder(self.from_latent(z))))
        return {"recon": recon, "z": z}


def load_encoder_weights(encoder: ResNetEncoder, path: str, depth: int) -> None:
    """Load a torchvision resnet state dict (fc dropped; conv1 averaged over RGB for one channel)."""
    where = f"model.args.weights '{path}'"
    if not Path(path).is_file():
        raise DefectaeError(f"{where}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise DefectaeError(
            f"{where}: not a readable PyTorch state dict ({type(e).__name__})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise DefectaeError(
            f"{where}: expected a torchvision resnet{depth} state dict with conv1.weight"
        )
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    w = state["conv1.weight"]  # (64, C_file, 7, 7)
    want = encoder.conv1.weight.shape[1]
    if w.ndim == 4 and w.shape[1] == 3 and want == 1:
        state["conv1.weight"] = w.mean(1, keepdim=True)
    elif w.ndim == 4 and w.shape[1] == 1 and want == 3:
        state["conv1.weight"] = w.repeat(1, 3, 1, 1) / 3
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise DefectaeError(f"{where}: does not fit a resnet{depth} encoder ({detail})") from None


@register("resnetae", "ResNet-18/34 encoder, latent 1024, residual upsampling decoder")
def build_resnetae(
    in_channels: int,
    input_size: int,
    depth: int = 18,
    latent_dim: int = 1024,
    bottleneck: str = "fc",
    weights: str = "",
) -> nn.Module:
    """Build `resnetae`; input_size must be a multiple of 32. `weights` is a local file or ''."""
    require_multiple(input_size, DIVISOR, "resnetae")
    if depth not in LAYERS:
        raise DefectaeError(f"model.args.depth {depth}: expected 18 or 34")
    if bottleneck not in ("fc", "conv"):
        raise DefectaeError(f"model.args.bottleneck '{bottleneck}': expected 'fc' or 'conv'")
    require_positive_int(latent_dim, "model.args.latent_dim")
    model = ResNetAE(in_channels, input_size, depth, latent_dim, bottleneck)
    if weights and weights != "none":  # "none": the checkpoint being loaded holds the weights
        load_encoder_weights(model.encoder, str(weights), depth)
    return model
