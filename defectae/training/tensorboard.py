"""What rank 0 writes as a run trains: one metrics.jsonl line and TensorBoard scalars per epoch.

TensorBoard tags are the metrics.jsonl keys with the first "_" as "/": train/total, val/ssim
(the mean SSIM index), train/ssim_term (the 1 - SSIM loss term), ...; plus step/loss every
optimizer step and, every `log_images_every` epochs, a grid of the validation images (with
synthetic anomalies for models that learn from them), their reconstructions and maps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectae import device as devices
from defectae.files import write_text_atomic
from defectae.profiles import TrainConfig

Tensor = torch.Tensor


class RunLog:
    """metrics.jsonl (rewritten atomically each epoch) and the TensorBoard writer of a run."""

    def __init__(
        self,
        run_dir: Path,
        epoch: int,
        step: int,
        cfg: TrainConfig,
        images: Tensor,
        masks: Tensor | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.cfg, self.images = run_dir / "metrics.jsonl", cfg, images
        self.masks = masks  # the synthetic anomalies of `images`, for models that learn from them
        self.metrics = read_metrics(self.path, epoch)
        self.writer = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=step + 1 if step else None
        )

    def step(self, loss: float, step: int) -> None:
        """The loss of one optimizer step."""
        self.writer.add_scalar("step/loss", loss, step)

    def epoch(self, record: dict[str, Any], model: nn.Module, dtype: torch.dtype | None) -> None:
        """Append an epoch's record to metrics.jsonl and log it to TensorBoard."""
        self.metrics.append(record)
        write_text_atomic(self.path, "".join(json.dumps(m) + "\n" for m in self.metrics))
        log_epoch(self.writer, record, model, self.images, dtype, self.cfg, self.masks)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        self.writer.close()


def read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """Earlier metrics of a resumed run, without the epochs it is about to redo."""
    if not path.is_file():
        return []
    return [
        m
        for m in (json.loads(line) for line in path.read_text().splitlines() if line)
        if m["epoch"] <= upto
    ]


def image_rows(images: Tensor, masks: Tensor | None, out: dict[str, Tensor]) -> list[Tensor]:
    """The rows of the logged grid: the input, the synthetic anomaly mask (models that learn from
    them), the reconstruction (unless the model returns its input) and the anomaly map, scaled
    to the batch's maximum."""
    rows = [images]
    if masks is not None:
        rows.append(masks.expand_as(images))
    recon = out["recon"].float().clamp(0, 1)
    if not torch.equal(recon, images.float()):
        rows.append(recon)
    if "map" in out:
        heat = out["map"].float()
        rows.append((heat / heat.amax().clamp_min(1e-12)).expand_as(images))
    return rows


@torch.no_grad()
def log_epoch(
    writer: Any,
    record: dict[str, Any],
    model: nn.Module,
    images: Tensor,
    dtype: torch.dtype | None,
    cfg: TrainConfig,
    masks: Tensor | None = None,
) -> None:
    """Epoch scalars, image grids every log_images_every epochs (see `image_rows`), optional histograms."""
    from torchvision.utils import make_grid

    epoch, step = record["epoch"], record["step"]
    for key, value in record.items():
        if key.startswith(("train_", "val_")):
            writer.add_scalar(key.replace("_", "/", 1), value, step)
    writer.add_scalar("lr", record["lr"], step)
    writer.add_scalar("grad_norm/mean", record["grad_norm"], step)
    writer.add_scalar("grad_norm/max", record["grad_norm_max"], step)
    writer.add_scalar("throughput/patches_per_s", record["patches_per_s"], step)
    writer.add_scalar("throughput/data_wait_fraction", record["data_wait_fraction"], step)
    if cfg.log_images_every and (epoch == 1 or epoch % cfg.log_images_every == 0):
        model.eval()
        with devices.autocast(images.device, dtype):
            out = model(images)
        model.train()
        grid = make_grid(
            torch.cat(image_rows(images, masks, out)).cpu(),
            nrow=images.shape[0],
            padding=2,
            pad_value=1.0,
        )
        writer.add_image("val/maps" if "map" in out else "val/reconstructions", grid, step)
    if cfg.histograms:
        for name, param in devices.unwrap(model).named_parameters():
            writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), step)
    writer.flush()
