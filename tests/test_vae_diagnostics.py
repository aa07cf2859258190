"""VAE diagnostics: the latent math against numpy, scipy and scikit-learn, the codes and decoder
against the models' own forward, and tile-test + score through the CLI for a VAE and a non-VAE."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import TINY_SYNTHETIC, defectae, untrained_checkpoint
from PIL import Image
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.metrics import average_precision_score, roc_auc_score

from defectae import profiles
from defectae.core import latent
from defectae.models import build_model
from defectae.stores.checkpoint import load_model

TINY_SPECVAE = {
    "encoder": ["C2d_1_8_3_2_0", "C2d_8_8_1_1_0"],  # mu: 4 x 8 x 8 for a 16x16 tile
    "decoder": ["C2d_4_8_3_1_1", "UpS_2", "C2d_8_1_3_1_1"],
}


def test_mahalanobis_by_hand():
    gaussian = latent.Gaussian(np.zeros(2), np.linalg.inv(np.diag([4.0, 1.0])))
    codes = np.array([[2.0, 0.0], [0.0, 3.0], [2.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(latent.mahalanobis(codes, gaussian), [1.0, 3.0, np.sqrt(10), 0.0])


@pytest.mark.parametrize("n, d", [(60, 4), (8, 20)])  # more dimensions than images: shrinkage
def test_mahalanobis_matches_numpy_and_scipy_with_ledoit_wolf(n, d):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, d) + 1.0
    test = rng.normal(size=(7, d)) * 2.0
    gaussian = latent.fit_gaussian(train)
    lw = LedoitWolf().fit(train)
    inv = np.linalg.inv(lw.covariance_)
    diff = test - train.mean(axis=0)
    by_hand = np.sqrt(np.sum(diff @ inv * diff, axis=1))
    by_scipy = [scipy_mahalanobis(x, lw.location_, inv) for x in test]
    got = latent.mahalanobis(test, gaussian)
    np.testing.assert_allclose(got, by_hand, rtol=1e-6)
    np.testing.assert_allclose(got, by_scipy, rtol=1e-6)
    assert np.isfinite(got).all() and (got > 0).all()
    with pytest.raises(ValueError):
        latent.fit_gaussian(train[:1])


@pytest.mark.parametrize("n, d", [(30, 6), (5, 12)])
def test_pca_matches_sklearn(n, d):
    rng = np.random.default_rng(1)
    codes = rng.normal(size=(n, d)) * np.linspace(3.0, 0.2, d)
    other = rng.normal(size=(4, d))
    ours = latent.pca_2d(codes)
    ref = PCA(n_components=2).fit(codes)
    signs = np.sign(np.sum(ours.components * ref.components_, axis=1))
    assert set(signs) == {1.0}  # both fix the sign by each component's largest entry
    np.testing.assert_allclose(ours.transform(codes), ref.transform(codes), atol=1e-9)
    np.testing.assert_allclose(ours.transform(other), ref.transform(other), atol=1e-9)
    np.testing.assert_allclose(ours.explained_ratio, ref.explained_variance_ratio_, rtol=1e-9)


def test_pca_of_one_dimensional_codes_has_a_zero_second_axis():
    projection = latent.pca_2d(np.array([[1.0], [2.0], [4.0]]))
    points = projection.transform(np.array([[1.0], [4.0]]))
    np.testing.assert_allclose(points[:, 1], 0.0)
    np.testing.assert_allclose(np.abs(points[:, 0]), [4 / 3, 5 / 3])
    np.testing.assert_allclose(projection.explained_ratio, [1.0, 0.0])


def test_tiled_codes_are_the_mean_of_each_tiles_mu():
    torch.manual_seed(0)
    model = build_model("specvae", 1, 16, TINY_SPECVAE).eval()
    images = torch.rand(2, 1, 24, 32)
    with torch.no_grad():
        codes = latent.image_codes(model, images, 16, 8, whole_image=False)
        expected = []
        for image in images:
            tiles = [
                image[:, y : y + 16, x : x + 16] for y in (0, 8) for x in (0, 8, 16)
            ]  # origins 0, 8 (rows) and 0, 8, 16 (columns)
            expected.append(model(torch.stack(tiles))["mu"].flatten(1).mean(0))
    assert codes.shape == (2, 4 * 8 * 8)
    torch.testing.assert_close(codes, torch.stack(expected))


def test_whole_image_codes_are_mu_of_the_resized_image():
    torch.manual_seed(0)
    model = build_model("vae1", 1, 32, {"latent_dim": 5}).eval()
    images = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        codes = latent.image_codes(model, images, 32, 32, whole_image=True)
        small = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(codes, model(small)["mu"])


@pytest.mark.parametrize(
    "family, args, size",
    [
        ("vae1", {"latent_dim": 6}, 32),
        ("vae2", {"latent_dim": 6, "attention": "se"}, 32),
        ("vae4", {"latent_dim": 6, "hidden_dim": 16}, 32),
        ("specvae", TINY_SPECVAE, 16),
    ],
)
def test_decoding_mu_reproduces_the_forward_reconstruction(family, args, size):
    torch.manual_seed(0)
    model = build_model(family, 1, size, args).eval()
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(latent.decode(model, out["mu"]), out["recon"])
        samples = latent.prior_samples(model, tuple(out["mu"].shape[1:]), 4, 0, torch.device("cpu"))
        again = latent.prior_samples(model, tuple(out["mu"].shape[1:]), 4, 0, torch.device("cpu"))
    assert samples.shape == (4, 1, size, size) and torch.equal(samples, again)


def test_skip_vaes_cannot_decode_prior_samples():
    model = build_model("vae5", 1, 32, {"latent_dim": 4, "hidden_dim": 8}).eval()
    assert latent.prior_samples(model, (4,), 2, 0, torch.device("cpu")) is None


def test_latent_metrics_match_sklearn_overall_and_per_type():
    rng = np.random.default_rng(2)
    types = ["good"] * 6 + ["hole"] * 3 + ["cut"] * 4
    labels = np.array([t != "good" for t in types])
    scores = rng.normal(size=13) + labels
    overall, per_type = latent.latent_metrics(scores, labels, types)
    assert overall["latent_image_auroc"].value == pytest.approx(roc_auc_score(labels, scores))
    assert overall["latent_image_auprc"].value == pytest.approx(
        average_precision_score(labels, scores)
    )
    hole = np.array([t in ("good", "hole") for t in types])
    assert per_type["hole"]["latent_image_auroc"].value == pytest.approx(
        roc_auc_score(labels[hole], scores[hole])
    )
    assert set(per_type) == {"cut", "hole"}
    undefined, _ = latent.latent_metrics(None, labels, types, "too few codes")
    assert all(m.value is None and m.reason == "too few codes" for m in undefined.values())


# ----------------------------------------------------------------------------- CLI end to end

VAE = [*TINY_SYNTHETIC, "model.input_size=64", "model.args.latent_dim=4", "tile.amp=off"]
AE = [*TINY_SYNTHETIC, "model.input_size=32", "model.args.latent_dim=8", "tile.stride=16"]
SPEC = [
    *TINY_SYNTHETIC,
    "dataset.color=gray",
    "model.input_size=16",
    f"model.args.encoder={json.dumps(TINY_SPECVAE['encoder'])}",
    f"model.args.decoder={json.dumps(TINY_SPECVAE['decoder'])}",
    "tile.stride=8",
    "tile.amp=off",
]


def _args(name: str, sets: list[str]) -> list[str]:
    return ["--profile", name, *(a for s in sets for a in ("--set", s))]


def _untrained_run(home: Path, name: str, sets: list[str]) -> Path:
    profile = profiles.resolve(name, sets=sets)
    run = home / "runs" / profile.name / "20250101-000000"
    untrained_checkpoint(run, profile)
    profiles.write_profile(profile, run)
    return run


def _caption_scores(index: Path) -> np.ndarray:
    """The image scores index.html shows under the panels, in the order of the test images."""
    found = re.findall(
        r'src="panels/(\d{4})_[^>]*><figcaption>[^<·]*· score ([^ <·]+)', index.read_text()
    )
    return np.array([float(value) for _, value in sorted(found)])


@pytest.fixture(scope="module")
def tested(tmp_path_factory) -> dict:
    """prepare once; untrained vae1 (whole image), specvae and ae (tiled) runs, tile-tested."""
    home = tmp_path_factory.mktemp("vae")
    defectae(home, "prepare", *_args("synthetic-vae1", VAE))
    runs = {}
    for name, sets in (("synthetic-vae1", VAE), ("synthetic-specvae", SPEC), ("synthetic-ae", AE)):
        runs[name] = _untrained_run(home, name, sets)
        defectae(home, "tile-test", *_args(name, sets))
    return {"home": home, "runs": runs}


@pytest.mark.slow
def test_vae_run_reports_latent_metrics_figures_and_the_latent_image_score(tested):
    home, run = tested["home"], tested["runs"]["synthetic-vae1"]
    with h5py.File(run / "residuals.h5") as f:
        test, train = f["latent/test"][()], f["latent/train"][()]
        residual_scores = f["test/scores"][()]
        labels = f["test/labels"][()].astype(bool)
        assert f["latent/prior_samples"].shape == (16, 1, 64, 64)
        assert f["latent"].attrs["per_image"] == "whole image"
    assert test.shape == (5, 4) and train.shape == (6, 4)  # 8 training images, 2 for validation

    summary = json.loads(defectae(home, "score", *_args("synthetic-vae1", VAE)).stdout)
    out = Path(summary["out"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["figures"]["latent_pca"] == "latent_pca.png"
    assert saved["figures"]["prior_samples"] == "prior_samples.png"
    for figure in ("latent_pca.png", "prior_samples.png"):
        assert Image.open(out / figure).size[0] > 100
        assert f'src="{figure}"' in (out / "index.html").read_text()
    lw = LedoitWolf().fit(train.astype(np.float64))
    inv = np.linalg.inv(lw.covariance_)
    distances = np.array([scipy_mahalanobis(x, lw.location_, inv) for x in test])
    m = saved["metrics"]
    assert saved["image_score"] == "residual" and saved["latent"]["train_codes"] == 6
    assert m["latent_image_auroc"] == pytest.approx(roc_auc_score(labels, distances))
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, residual_scores))
    assert "latent_image_auroc" in saved["per_type"]["hole"]["metrics"]
    np.testing.assert_allclose(_caption_scores(out / "index.html"), residual_scores, rtol=1e-3)

    latent_out = home / "latent-score"
    sets = [*VAE, "score.image_score=latent"]
    defectae(home, "score", *_args("synthetic-vae1", sets), "--out", str(latent_out))
    chosen = json.loads((latent_out / "metrics.json").read_text())
    assert chosen["image_score"] == "latent"
    assert chosen["metrics"]["image_auroc"] == pytest.approx(roc_auc_score(labels, distances))
    np.testing.assert_allclose(_caption_scores(latent_out / "index.html"), distances, rtol=1e-3)
    assert not np.allclose(distances, residual_scores, rtol=1e-2)


@pytest.mark.slow
def test_tiled_vae_stores_the_mean_tile_code_of_every_test_and_training_image(tested):
    run = tested["runs"]["synthetic-specvae"]
    model, _, _ = load_model(run / "best.pt")
    prepared = tested["home"] / "work" / "synthetic" / "prepared.h5"
    with h5py.File(run / "residuals.h5") as f, h5py.File(prepared) as p, torch.no_grad():
        assert f["latent"].attrs["per_image"] == "mean over tiles"
        assert list(f["latent"].attrs["latent_shape"]) == [4, 8, 8]
        assert f["latent/prior_samples"].shape == (16, 1, 16, 16)
        for split in ("test", "train"):
            images = torch.from_numpy(p[f"{split}/images"][()]).float() / 255
            tiles = images.unfold(2, 16, 8).unfold(3, 16, 8)  # (N, 1, 7, 7, 16, 16), stride 8
            tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, 16, 16)
            mu = model(tiles)["mu"].flatten(1).reshape(len(images), 49, -1).mean(1)
            np.testing.assert_allclose(f[f"latent/{split}"][()], mu.numpy(), atol=1e-5)


@pytest.mark.slow
def test_non_vae_run_has_no_latent_diagnostics(tested):
    home, run = tested["home"], tested["runs"]["synthetic-ae"]
    with h5py.File(run / "residuals.h5") as f:
        assert "latent" not in f
    summary = json.loads(defectae(home, "score", *_args("synthetic-ae", AE)).stdout)
    out = Path(summary["out"])
    saved = json.loads((out / "metrics.json").read_text())
    assert "image_score" not in saved and "latent" not in saved
    assert not any(k.startswith("latent") for k in saved["metrics"])
    assert not (out / "latent_pca.png").exists() and not (out / "prior_samples.png").exists()

    proc = defectae(
        home, "score", *_args("synthetic-ae", [*AE, "score.image_score=latent"]), code=2
    )
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "score.image_score 'latent'" in errors[0], proc.stderr
