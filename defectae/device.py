"""The one device / mixed-precision / compile policy shared by train, tile-test, export and bench."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from defectae import console
from defectae.errors import DefectaeError, first_line


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; an unavailable device is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DefectaeError(f"device '{name}': expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DefectaeError(f"device '{name}': CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise DefectaeError(f"device '{name}': expected auto, cpu, cuda or cuda:N")
    return device


def amp_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype for a mode: bfloat16 on CPU and on GPUs that support it, else float16."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to `dtype`, or a no-op when mixed precision is off."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """Only float16 needs loss scaling; bfloat16 has float32's range."""
    return dtype == torch.float16


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """`torch.compile` the model, or return it unchanged when disabled.

    Compilation is lazy, so callers that want the eager fallback run one forward
    through `compile_or_eager`.
    """
    if not enabled:
        return model
    # the CUDA build of torch warns once, on a CPU-only machine, that it found no CUDA runtime
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        return torch.compile(model)  # type: ignore[return-value]
    except Exception as e:  # noqa: BLE001 - any backend failure means: run eagerly
        console.warn(f"torch.compile unavailable ({type(e).__name__}: {e}); running eagerly")
        return model


def compile_or_eager(model: nn.Module, enabled: bool, example: torch.Tensor) -> nn.Module:
    """Compile and run one forward on `example`; on any compiler failure warn once and use eager."""
    if not enabled:
        return model
    compiled = maybe_compile(model, True)
    if compiled is model:
        return model
    try:
        with torch.no_grad():
            compiled(example)
    except Exception as e:  # noqa: BLE001
        console.warn(f"torch.compile failed ({first_line(e)}); running eagerly")
        return model
    return compiled


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers (for state dicts)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def amp_name(dtype: torch.dtype | None) -> str:
    """The AMP mode as reports name it: "bfloat16", "float16" or "off"."""
    return str(dtype).replace("torch.", "") if dtype else "off"


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG `torch.random.fork_rng` must save for work on `device`."""
    return [device.index or 0] if device.type == "cuda" else []


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock timings are honest; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_for_training(model: nn.Module, enabled: bool, example: torch.Tensor) -> nn.Module:
    """compile_or_eager with its trial forward in eval mode, leaving no trace: BatchNorm
    statistics do not move and the RNG stream is untouched."""
    if not enabled:
        return model
    model.eval()
    with torch.random.fork_rng(devices=rng_devices(example.device)):
        compiled = compile_or_eager(model, True, example)
    model.train()
    return compiled


class TimedModel(nn.Module):
    """A reconstruction (or feature-space) model under autocast that adds up the wall time of its forward passes
    (tile-test reports the share of time outside the model; bench measures it)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.device = device
        self.dtype = dtype
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        synchronize(self.device)
        start = time.perf_counter()
        with autocast(self.device, self.dtype):
            out = self.model(x)
        key = "map" if "map" in out else "recon"  # feature-space models: their anomaly map
        result = {key: out[key].float()}
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return result
