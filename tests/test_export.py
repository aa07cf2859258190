"""`defectae export`: verified TorchScript / ONNX round trips, metadata, int8, refusals, bad input."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import untrained_checkpoint
from sklearn.metrics import roc_auc_score

from defectae import profiles
from defectae.commands import export, score, tiletest
from defectae.core.inspector import Inspector
from defectae.core.metrics import label_free_threshold
from defectae.errors import DefectaeError
from defectae.export import converters
from defectae.files import sha256_file
from defectae.models import build_model
from defectae.stores.checkpoint import load_checkpoint, load_model, save_checkpoint
from defectae.stores.patches import write_patches
from defectae.stores.prepared import PreparedSplit, write_prepared
from defectae.stores.residuals import SPLITS, create_residuals, create_split
from defectae.stores.scores import write_metrics

SETS = [
    "model.input_size=32",
    "model.args.latent_dim=8",
    "dataset.image_size=[64, 64]",
    "tile.stride=16",
    "tile.batch_size=32",
]
TYPES = ["good", "good", "good", "scratch", "hole", "scratch"]
ARTEFACTS = [
    "model.pt",
    "inspector.pt",
    "model.onnx",
    "inspector.onnx",
    "model_int8.pt",
    "inspector_int8.pt",
]


def _split(
    rng: np.random.Generator, types: list[str], size: tuple[int, int] = (64, 64)
) -> PreparedSplit:
    n = len(types)
    images = rng.integers(60, 200, (n, 1, *size), dtype=np.uint8)
    masks = np.zeros((n, 1, *size), np.uint8)
    labels = np.array([t != "good" for t in types], np.uint8)
    for i in np.flatnonzero(labels):  # a bright square defect
        images[i, :, 20:30, 24:34] = 255
        masks[i, :, 20:30, 24:34] = 1
    return PreparedSplit(
        images,
        masks,
        labels,
        types,
        [f"{i:03d}" for i in range(n)],
        [f"{t}/{i:03d}.png" for i, t in enumerate(types)],
        np.tile(np.array(size, np.int32), (n, 1)),
    )


def make_run(
    root: Path,
    sets: list[str] = SETS,
    with_data: bool = True,
    size: tuple[int, int] = (64, 64),
    attrs: dict | None = None,
) -> Path:
    """A run folder with an untrained tiny `ae` checkpoint; with_data adds patches.h5, prepared.h5
    (images stored at `size`, with `attrs` added to its attributes) and residuals.h5."""
    profile = profiles.resolve("synthetic-ae", sets=sets)
    run = root / "run"
    run.mkdir(parents=True)
    checkpoint = untrained_checkpoint(run, profile)
    if with_data:
        rng = np.random.default_rng(0)
        prepared = write_prepared(
            root / "prepared.h5",
            {
                "train": _split(rng, ["good"] * 2, size),
                "validation": _split(rng, ["good"] * 3, size),
                "test": _split(rng, TYPES, size),
            },
            {
                "layout": "synthetic",
                "source": "test",
                "category": "woven",
                "image_size": list(size),
                "color": "gray",
                "channels": 1,
                "dataset": {"name": "synthetic"},
                **(attrs or {}),
            },
        )
        patches = rng.integers(0, 256, (16, 1, 32, 32), dtype=np.uint8)
        state = load_checkpoint(checkpoint)
        state["patches"] = str(write_patches(root / "patches.h5", patches, patches, {"seed": 0}))
        save_checkpoint(state, checkpoint)
        with (
            h5py.File(prepared, "r") as src,
            create_residuals(run / "residuals.h5", profile.tile, prepared=str(prepared)) as f,
        ):
            for split in SPLITS:
                n = len(src[f"{split}/labels"])
                maps = rng.random((n, 1, *size)).astype(np.float16)
                create_split(f, src, split, False).write(0, maps, maps.max((1, 2, 3)), maps)
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    run = make_run(tmp_path_factory.mktemp("export"))
    return run, export.run(run, "all", int8=True, out=None)


def _load_ts(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {"defectae.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    return module, json.loads(extra["defectae.json"])


def test_all_artefacts_round_trip_within_tolerance_at_a_new_batch_size(exported):
    run, summary = exported
    out = run / "export"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ARTEFACTS + ["profile.toml", "export.json"]
    )
    assert summary["out"] == str(out) and len(summary["files"]) == len(ARTEFACTS) + 2
    assert set(summary["max_abs_diff"]) == set(ARTEFACTS)
    assert all(0 <= d <= export.TOLERANCE for d in summary["max_abs_diff"].values())
    assert (
        "validation patches" in summary["verified_on"]
        and "validation images" in summary["verified_on"]
    )

    model, _, _ = load_model(run / "best.pt")
    tile = profiles.resolve("synthetic-ae", sets=SETS).tile
    g = torch.Generator().manual_seed(1)
    patches, images = torch.rand(5, 1, 32, 32, generator=g), torch.rand(4, 1, 64, 64, generator=g)
    with torch.no_grad():
        want_recon = model(patches)["recon"]
        want = Inspector(model, patch_size=32, **tile.inspector_options())(images)

    ts_model, _ = _load_ts(out / "model.pt")
    ts_inspector, _ = _load_ts(out / "inspector.pt")
    with torch.no_grad():
        assert torch.allclose(ts_model(patches), want_recon, atol=1e-5)
        for got, ref in zip(ts_inspector(images), want, strict=True):
            assert torch.allclose(got, ref, atol=1e-5)

    for name, x, ref in (("model.onnx", patches, (want_recon,)), ("inspector.onnx", images, want)):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert len(got) == len(ref)
        for g_, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g_, r.numpy(), atol=1e-4)


def test_metadata_holds_preprocessing_and_the_validation_threshold(exported):
    run, summary = exported
    out = run / "export"
    with h5py.File(run / "residuals.h5", "r") as f:
        expected = label_free_threshold(
            f["validation/residuals"][()],
            **profiles.resolve("synthetic-ae", sets=SETS).score.threshold_options(),
        )
    assert summary["threshold"]["value"] == pytest.approx(expected.value)

    _, meta = _load_ts(out / "inspector.pt")
    proto = onnx.load(str(out / "inspector.onnx"))
    onnx_meta = json.loads({p.key: p.value for p in proto.metadata_props}["defectae.json"])
    for m in (meta, onnx_meta):
        assert m["artefact"] == "inspector" and m["precision"] == "fp32" and m["family"] == "ae"
        assert (
            m["input"]["image_size"] == [64, 64]
            and m["input"]["color"] == "gray"
            and m["input"]["channels"] == 1
        )
        assert "255" in m["input"]["scaling"]
        assert m["input"]["resize"] == "bilinear to image_size (as `defectae prepare`)"
        assert m["input"]["intensity"] == {"mode": "none"}
        assert m["threshold"]["value"] == pytest.approx(expected.value)
        assert m["patch_size"] == 32 and m["tile"]["stride"] == 16
    _, recon_meta = _load_ts(out / "model.pt")
    assert recon_meta["input"]["image_size"] == [32, 32] and recon_meta["outputs"] == {
        "recon": ["batch", 1, 32, 32]
    }

    assert proto.opset_import[0].version >= 17 or any(o.version >= 17 for o in proto.opset_import)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch axis
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["max_abs_diff"] == summary["max_abs_diff"]


def test_int8_reports_auroc_changes_against_an_independent_fp32_auroc(exported):
    run, summary = exported
    q = summary["int8"]
    assert q["quantization"].startswith("static") and q["test_images"] == len(TYPES)
    for name in ("image_auroc", "pixel_auroc"):
        assert q[f"{name}_delta"] == pytest.approx(q[f"{name}_int8"] - q[f"{name}_fp32"])
    model, _, _ = load_model(run / "best.pt")
    tile = profiles.resolve("synthetic-ae", sets=SETS).tile
    with h5py.File(run.parent / "prepared.h5", "r") as f:
        images = torch.from_numpy(f["test/images"][()]).float() / 255
        labels = f["test/labels"][()]
    with torch.no_grad():
        scores = Inspector(model, patch_size=32, batch_size=32, **tile.inspector_options())(images)[
            1
        ]
    assert q["image_auroc_fp32"] == pytest.approx(roc_auc_score(labels, scores.numpy()))
    _, meta = _load_ts(run / "export" / "model_int8.pt")
    assert meta["precision"] == "int8" and meta["quantization"] == q["quantization"]


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05)


def test_a_torchscript_export_differing_from_eager_is_refused_and_nothing_written(
    tmp_path, monkeypatch
):
    run = make_run(tmp_path)
    real = converters.to_torchscript

    def altered_after_tracing(module, example):
        traced = real(
            copy.deepcopy(module), example
        )  # a trace shares the module's weights: alter a copy's
        _perturb(traced)
        return traced

    monkeypatch.setattr(converters, "to_torchscript", altered_after_tracing)
    with pytest.raises(
        DefectaeError, match=r"model\.pt: .*differs from the eager model .*nothing was written"
    ):
        export.run(run, "torchscript", int8=False, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_onnx_export_of_a_model_altered_after_export_is_refused(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    real = converters.to_onnx

    def export_then_alter(module, *args, **kwargs):
        result = real(module, *args, **kwargs)
        _perturb(module)
        return result

    monkeypatch.setattr(converters, "to_onnx", export_then_alter)
    with pytest.raises(DefectaeError, match=r"model\.onnx: .*differs from the eager model"):
        export.run(run, "onnx", int8=False, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_data_it_verifies_on_random_inputs_and_stores_no_threshold(tmp_path, home):
    run = make_run(tmp_path, with_data=False)
    summary = export.run(run, "torchscript", int8=False, out=None)
    assert "random patches" in summary["verified_on"] and "random images" in summary["verified_on"]
    assert summary["threshold"]["value"] is None and "tile-test" in summary["threshold"]["reason"]
    _, meta = _load_ts(run / "export" / "inspector.pt")
    assert meta["threshold"]["value"] is None


def test_the_threshold_and_its_settings_come_from_score_metrics_json_first(tmp_path):
    run = make_run(tmp_path)
    profile = profiles.resolve("synthetic-ae", sets=SETS)
    l1 = dataclasses.replace(profile.tile, residual={"l1": 1.0})
    threshold = {"method": "val_quantile", "quantile": 0.999, "value": 0.25, "reason": None}
    summary = {"tile": profiles.to_dict(profile)["tile"] | {"residual": {"l1": 1.0}}}
    summary.update(threshold=threshold, residuals_sha256=sha256_file(run / "residuals.h5"))
    write_metrics(run / "score" / "metrics.json", summary)
    tile, found = export.test_settings(run, profile)
    assert tile == l1 and found["value"] == 0.25 and found["source"].endswith("metrics.json")

    (run / "residuals.h5").write_bytes((run / "residuals.h5").read_bytes() + b"\0")
    with pytest.raises(DefectaeError, match="tile-test ran again after score"):
        export.test_settings(run, profile)


def test_the_inspector_is_built_from_the_settings_whose_threshold_it_ships(tmp_path):
    """tile-test with another residual, then score, then export: the export computes that residual."""
    run = make_run(tmp_path)
    l2 = profiles.resolve("synthetic-ae", sets=[*SETS, "tile.residual={ssim=0, l2=1}"])
    tiletest.run(l2, run, tmp_path / "prepared.h5", None, None)
    scored = score.run(None, run, None, None, "mvtec", None)
    summary = export.run(run, "torchscript", int8=False, out=None)
    assert summary["threshold"]["value"] == pytest.approx(scored["threshold"]["value"])
    inspector, meta = _load_ts(run / "export" / "inspector.pt")
    assert meta["tile"]["residual"] == {"ssim": 0.0, "l2": 1.0}
    model, _, _ = load_model(run / "best.pt")
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    want = Inspector(model, patch_size=32, **l2.tile.inspector_options())(images)[0]
    with torch.no_grad():
        torch.testing.assert_close(inspector(images)[0], want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_one_line_errors(tmp_path, monkeypatch):
    run = make_run(tmp_path, with_data=False)
    with pytest.raises(
        DefectaeError, match=r"--format 'tflite': expected torchscript, onnx or all"
    ):
        export.run(run, "tflite", int8=False, out=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DefectaeError, match=r"no best.pt or last.pt"):
        export.run(tmp_path / "empty", "torchscript", int8=False, out=None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(DefectaeError, match=r"pip install 'defectae\[export\]'"):
        export.run(run, "all", int8=False, out=None)
    assert not (run / "export").exists()


def _cli_export(run: Path, fmt: str) -> subprocess.CompletedProcess:
    """`defectae export --run RUN --format FMT` through the installed console script."""
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("defectae")),
            "export",
            "--run",
            str(run),
            "--format",
            fmt,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_unknown_format_exits_2_with_one_red_line(tmp_path):
    run = make_run(tmp_path, with_data=False)
    proc = _cli_export(run, "tflite")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "--format 'tflite'" in proc.stderr


# short side 64: prepare stores its 2:3 images at 64x96, which image_size alone cannot tell
SHORT_SIDE = [*SETS, "dataset.image_size=[64, 80]", "dataset.resize=short-side"]


def test_a_short_side_run_exports_for_the_size_its_prepared_file_stores(tmp_path):
    run = make_run(tmp_path, SHORT_SIDE, size=(64, 96), attrs={"resize": "short-side"})
    summary = export.run(run, "torchscript", int8=False, out=None)
    assert "3 validation images" in summary["verified_on"]  # the stored 64x96 ones, not random
    inspector, meta = _load_ts(run / "export" / "inspector.pt")
    assert meta["input"]["shape"] == ["batch", 1, 64, 96]
    assert meta["input"]["image_size"] == [64, 96]
    assert meta["outputs"]["residual"] == ["batch", 1, 64, 96]
    assert meta["input"]["resize"].startswith("short side to 64, long side to the nearest multiple")
    assert meta["input"]["resize"].endswith("this export expects 64x96")
    with h5py.File(tmp_path / "prepared.h5", "r") as f:
        images = torch.from_numpy(f["validation/images"][:2]).float() / 255
    model, _, _ = load_model(run / "best.pt")
    tile = profiles.resolve("synthetic-ae", sets=SHORT_SIDE).tile
    with torch.no_grad():
        want = Inspector(model, patch_size=32, **tile.inspector_options())(images)
        for got, ref in zip(inspector(images), want, strict=True):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_intensity_mode_and_training_targets_are_in_the_metadata(tmp_path, home):
    sets = [*SETS, "dataset.intensity=mean-std"]
    targets = {"intensity": "mean-std", "intensity_mean": 117.25, "intensity_std": 31.5}
    run = make_run(tmp_path / "a", sets, attrs=targets)
    export.run(run, "torchscript", int8=False, out=None)
    with h5py.File(tmp_path / "a" / "prepared.h5", "r") as f:
        mean, std = f.attrs["intensity_mean"], f.attrs["intensity_std"]
    for name in ("inspector.pt", "model.pt"):
        intensity = _load_ts(run / "export" / name)[1]["input"]["intensity"]
        assert intensity["mode"] == "mean-std"
        assert (intensity["mean"], intensity["std"]) == (mean, std) == (117.25, 31.5)
        assert "defectae.data.lighting.normalise_intensity" in intensity["how"]
    bare = make_run(tmp_path / "b", sets, with_data=False)
    with pytest.raises(
        DefectaeError, match=r"dataset.intensity = 'mean-std'.*prepared.h5, not found"
    ):
        export.run(bare, "torchscript", int8=False, out=None)


def test_cli_short_side_run_without_its_prepared_file_exits_2_with_one_line(tmp_path, home):
    run = make_run(tmp_path, SHORT_SIDE, with_data=False)
    proc = _cli_export(run, "torchscript")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0
    assert "short-side" in proc.stderr and "prepared.h5, not found" in proc.stderr
    assert not (run / "export").exists()


def test_metadata_helpers_round_trip_bytes():
    model = converters.Reconstruction(build_model("ae", 1, 16, {"latent_dim": 4})).eval()
    x = torch.rand(2, 1, 16, 16)
    data = converters.torchscript_bytes(converters.to_torchscript(model, x), {"a": 1})
    module, meta = converters.load_torchscript(data)
    assert meta == {"a": 1} and torch.allclose(module(x), model(x))
    onnx_bytes, _ = converters.to_onnx(model, x, "patch", ["recon"])
    assert converters.onnx_metadata(converters.with_onnx_metadata(onnx_bytes, {"b": 2})) == {"b": 2}
    assert onnx.load(io.BytesIO(onnx_bytes)).graph.output[0].name == "recon"


@pytest.mark.parametrize("normalize", ["global", "pixel"])
def test_the_exported_inspector_scores_as_tile_test_did_with_normalised_maps(tmp_path, normalize):
    run = make_run(tmp_path)
    sets = [*SETS, f"tile.normalize={normalize}", "tile.fusion=gaussian", "tile.smooth_sigma=1.5"]
    sets += ["tile.amp=off", "tile.device=cpu"]  # tile-test in float32, as the export runs
    tiletest.run(
        profiles.resolve("synthetic-ae", sets=sets), run, tmp_path / "prepared.h5", None, None
    )
    export.run(run, "torchscript", int8=False, out=None)
    inspector, meta = _load_ts(run / "export" / "inspector.pt")
    assert meta["tile"]["normalize"] == normalize
    with h5py.File(tmp_path / "prepared.h5", "r") as f:
        images = torch.from_numpy(f["test/images"][()]).float() / 255
    with h5py.File(run / "residuals.h5", "r") as f:
        want_scores, want_maps = f["test/scores"][()], f["test/residuals"][()]
        assert "normalization/mean" in f
    with torch.no_grad():
        maps, scores, _ = inspector(images)
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps.numpy(), want_maps.astype(np.float32), rtol=2e-3, atol=2e-3)
