"""Timing and memory probes: throughput of the pieces the commands run, without file I/O."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from defectae import device as devices
from defectae.core.inspector import Inspector, inspect_uint8
from defectae.profiles import TileConfig


def tile_throughput(
    model: nn.Module,
    image_size: int | tuple[int, int],
    patch_size: int,
    stride: int,
    tile_cfg: TileConfig,
    n_images: int,
    device: str | torch.device = "cpu",
    channels: int = 1,
    whole_image: bool = False,
    amp: torch.dtype | None = None,
) -> dict[str, float]:
    """tile-test speed on random images (no file I/O): images/s and the share outside the model.

    One warm-up image is excluded; the outside share covers patching, fusion, residual, score
    and the copies back to the CPU.
    """
    device = torch.device(device)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    timed = devices.TimedModel(model.to(device).eval(), device, amp)
    inspector = Inspector(
        timed,
        patch_size=patch_size,
        whole_image=whole_image,
        batch_size=tile_cfg.batch_size,
        **{**tile_cfg.inspector_options(), "stride": stride},
    )
    images = np.random.default_rng(0).integers(0, 256, (1, channels, h, w), dtype=np.uint8)
    with torch.inference_mode():
        inspect_uint8(inspector, images, device)
        timed.seconds = 0.0
        devices.synchronize(device)
        start = time.perf_counter()
        for _ in range(n_images):
            inspect_uint8(inspector, images, device)
        devices.synchronize(device)
        seconds = time.perf_counter() - start
    return {
        "images_per_s": n_images / seconds,
        "outside_model_share": 1.0 - timed.seconds / seconds,
        "seconds": seconds,
        "model_seconds": timed.seconds,
    }
