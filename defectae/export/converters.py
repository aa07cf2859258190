"""TorchScript and ONNX conversion, serialisation with metadata, and running the files back.

Shared by `export` (which verifies and writes the artefacts) and `bench` (which times them).
Everything here runs on tensors and bytes; nothing touches the disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from defectae.errors import DefectaeError, first_line

# Opset 17 or newer as asked; 18 is the first with Col2Im (F.fold), which the inspector's fusion uses.
OPSET = 18
METADATA = "defectae.json"
EXTRA = "pip install 'defectae[export]'"


class Reconstruction(nn.Module):
    """The model with one tensor as its output: "recon" (B, C, P, P), or for feature-space
    models, which reconstruct no pixels, their anomaly "map" (B, 1, P, P)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.key = "map" if getattr(model, "maps_anomalies", False) else "recon"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.key]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence exporter chatter: warnings, and prints to stdout (also C++ ones), which is --json's."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 1)
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def batch_of(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` samples of x, repeated when x has fewer."""
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous()


def outputs(result: Any) -> tuple[torch.Tensor, ...]:
    """A module's result as a tuple of tensors (one tensor becomes a 1-tuple)."""
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def max_abs_diff(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    """The largest absolute difference over all outputs (inf for a shape mismatch or NaN)."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if a.shape != b.shape:
            return float("inf")
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        worst = max(worst, diff if diff == diff else float("inf"))
    return worst


# ----------------------------------------------------------------------------- TorchScript


def to_torchscript(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace `module` on `example`; every size but the batch is fixed by the trace."""
    with quiet(), torch.no_grad():
        return torch.jit.trace(module.eval(), example, check_trace=False)


def torchscript_bytes(traced: torch.jit.ScriptModule, metadata: dict[str, Any]) -> bytes:
    """The TorchScript file, with `metadata` as the extra file defectae.json."""
    buffer = io.BytesIO()
    with quiet():
        torch.jit.save(traced, buffer, _extra_files={METADATA: json.dumps(metadata, indent=2)})
    return buffer.getvalue()


def load_torchscript(data: bytes) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript file's module and its defectae.json metadata."""
    extra = {METADATA: ""}
    with quiet():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[METADATA]) if extra[METADATA] else {}


# ----------------------------------------------------------------------------- ONNX


def require_onnx() -> None:
    """ONNX export needs onnx and onnxruntime (and onnxscript for the dynamo exporter)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise DefectaeError(
            f"--format onnx: the ONNX packages are not installed ({e.name or e}); run {EXTRA}"
        ) from None


def to_onnx(
    module: nn.Module,
    example: torch.Tensor,
    input_name: str,
    output_names: list[str],
    prefer_dynamo: bool = False,
) -> tuple[bytes, str]:
    """ONNX bytes (opset OPSET, dynamic batch axis) and the name of the exporter that made them.

    The TorchScript-based exporter is tried first (robust and fast for convnets), then the
    dynamo one; `prefer_dynamo` reverses the order (the inspector's fusion needs dynamo's
    shape tracking to keep the batch dynamic).
    """
    require_onnx()
    attempts = (
        [_onnx_dynamo, _onnx_torchscript] if prefer_dynamo else [_onnx_torchscript, _onnx_dynamo]
    )
    errors = []
    for attempt in attempts:
        try:
            with quiet(), torch.no_grad():
                return attempt(module.eval(), example, input_name, output_names)
        except Exception as e:  # noqa: BLE001 - an exporter that cannot handle the model: try the next
            errors.append(f"{attempt.__doc__}: {first_line(e)}")
    raise RuntimeError("; ".join(errors))


def _onnx_torchscript(
    module: nn.Module, example: torch.Tensor, input_name: str, outputs: list[str]
) -> tuple[bytes, str]:
    """torchscript exporter"""
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [input_name, *outputs]}
    torch.onnx.export(
        module,
        (example,),
        buffer,
        dynamo=False,
        opset_version=OPSET,
        input_names=[input_name],
        output_names=outputs,
        dynamic_axes=axes,
    )
    return buffer.getvalue(), "torch.onnx (TorchScript)"


def _onnx_dynamo(
    module: nn.Module, example: torch.Tensor, input_name: str, outputs: list[str]
) -> tuple[bytes, str]:
    """dynamo exporter"""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[input_name],
        output_names=outputs,
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    return program.model_proto.SerializeToString(), "torch.onnx (dynamo)"


def with_onnx_metadata(data: bytes, metadata: dict[str, Any]) -> bytes:
    """The ONNX model with `metadata` as the metadata_props entry defectae.json."""
    import onnx

    proto = onnx.load_from_string(data)
    for prop in [p for p in proto.metadata_props if p.key == METADATA]:
        proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA, json.dumps(metadata, indent=2)
    return proto.SerializeToString()


def onnx_metadata(data: bytes) -> dict[str, Any]:
    """The defectae.json metadata of an ONNX model."""
    import onnx

    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    return json.loads(props[METADATA]) if METADATA in props else {}


def onnx_session(data: bytes, providers: list[str] | None = None) -> Any:
    """An onnxruntime session on the CPU (or the given providers)."""
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(data, options, providers=providers or ["CPUExecutionProvider"])


def run_onnx(session: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run an onnxruntime session on one input tensor; outputs as CPU tensors."""
    name = session.get_inputs()[0].name
    return tuple(
        torch.from_numpy(np.asarray(o)) for o in session.run(None, {name: x.cpu().numpy()})
    )
