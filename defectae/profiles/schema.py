"""The typed profile: every key a profile may set, its type, default and allowed range.

This is the only place that knows profile keys and defaults. A section is a frozen
dataclass; `meta(...)` attaches the range check and a one-line description used in
error messages and `defectae profiles show`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Literal

Range = tuple[float | None, float | None]
Backbone = Literal["efficientnet-lite0", "resnet18", "wide_resnet50_2", "vgg16"]  # models.backbones


def opt(default: Any, lo: float | None = None, hi: float | None = None, doc: str = "") -> Any:
    """A dataclass field with an inclusive numeric range and a short description."""
    meta = {"range": (lo, hi), "doc": doc}
    if isinstance(default, (list, dict)) or is_dataclass(default):  # a fresh copy per instance
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class FoldersOptions:
    """Plain-folder layout: one good folder, defect folders named by type, masks by suffix."""

    good_dir: str = opt("good", doc="folder of defect-free images, relative to root")
    defect_dirs: list[str] = opt([], doc="folders of defective images; empty = every other folder")
    image_subdir: str = opt("", doc="sub-folder holding the images inside each folder (e.g. Imgs)")
    mask_dir: str = opt(
        "", doc="parallel folder of masks, relative to root; empty = next to images"
    )
    mask_suffix: str = opt("_mask", doc="mask file stem = image stem + this suffix")
    mask_ext: str = opt(".png", doc="mask file extension")
    image_exts: list[str] = opt([".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"])
    type_prefix: str = opt(
        "", doc="prefix stripped from folder names to give the defect type (e.g. MT_)"
    )
    label_from_mask: bool = opt(
        False,
        doc="good or defective per image from its mask (absent or all-zero = good), in every folder",
    )
    type_pattern: str = opt(
        "", doc="regex with a named group 'type' searched in the file name: the defect type"
    )
    default_type: str = opt(
        "", doc="defect type of every defective image; empty = the folder name (or type_pattern)"
    )


@dataclass(frozen=True)
class ManifestOptions:
    """A CSV or JSON-lines file with one row per image: image, mask, label, split, group."""

    file: str = opt(
        "labels.csv", doc="manifest (.csv with a header row, or .jsonl), relative to root"
    )
    types: list[str] = opt([], doc="allowed defect type labels; empty = any")
    default_type: str = opt("defect", doc="type of a row labelled defective by its mask alone")


@dataclass(frozen=True)
class PatternsOptions:
    """Images found by glob patterns in nested folders, masks by a name template."""

    images: list[str] = opt([], doc="glob patterns relative to root (e.g. ['kos*/Part*.jpg'])")
    mask: str = opt(
        "",
        doc="mask path relative to the image's folder, with {stem} {name} {parent} {dir} "
        "(e.g. '{stem}_label.bmp'); empty = no masks",
    )
    label_from_mask: bool = opt(
        True, doc="defective when the mask has a non-zero pixel; false = from the folder name"
    )
    type_pattern: str = opt(
        "", doc="regex with a named group 'type' searched in the file name: the defect type"
    )
    default_type: str = opt("defect", doc="defect type of a defective image without type_pattern")
    group: str = opt(
        "none",
        doc="images never split apart: 'folder' (same folder), 'none' (each image alone) or a "
        "regex searched in the path (its group 'group', else the whole match)",
    )
    image_exts: list[str] = opt([".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"])


@dataclass(frozen=True)
class AitexOptions:
    """AITEX fabric strips (4096x256) cut into square tiles."""

    fabrics: list[str] = opt([], doc="fabric codes to use (e.g. ['00', '01']); empty = all")
    tile_stride: int = opt(0, 0, None, doc="stride between tiles along the strip; 0 = tile width")
    exclude: list[str] = opt(
        [], doc="image stems to leave out (e.g. a defect strip shipped without a mask)"
    )


@dataclass(frozen=True)
class SyntheticOptions:
    """The procedural texture generator used by the demo and the tests."""

    texture: Literal["woven", "grid"] = opt("woven", doc="procedural texture family")
    size: int = opt(256, 32, 4096, doc="generated image side in pixels")
    n_train: int = opt(60, 1, None)
    n_test_good: int = opt(10, 0, None)
    n_test_defect: int = opt(20, 0, None, doc="defective test images, spread over the defect types")
    defect_types: list[str] = opt(
        ["scratch", "hole", "stain", "broken_thread", "contamination"],
        doc="subset of scratch, hole, stain, broken_thread, contamination",
    )


@dataclass(frozen=True)
class DatasetConfig:
    """Where a dataset lives, how it is laid out, and how it is split and resized."""

    name: str = opt("", doc="dataset profile name (filled in by the loader)")
    layout: Literal["mvtec", "mvtec3d", "aitex", "folders", "synthetic", "manifest", "patterns"] = (
        opt("mvtec")
    )
    root: str = opt("", doc="dataset folder; relative paths are relative to the current directory")
    category: str = opt("", doc="MVTec category folder under root (empty = root is the category)")
    image_size: tuple[int, int] = opt((256, 256), 8, 8192, doc="[H, W] every image is resized to")
    resize: Literal["stretch", "short-side"] = opt(
        "stretch",
        doc="stretch: to image_size exactly; short-side: short side to min(image_size), "
        "aspect ratio kept (long side a multiple of 8)",
    )
    intensity: Literal["none", "mean", "mean-std"] = opt(
        "none",
        doc="per-image lighting: shift each image's mean (mean-std: and scale its std) "
        "to the training images' average, after resizing",
    )
    color: Literal["gray", "rgb"] = opt("gray")
    val_fraction: float = opt(
        0.1, 0.0, 0.9, doc="share of defect-free training images held out for validation"
    )
    train_list: str = opt(
        "", doc="text file naming the training images; the other good images become test-good"
    )
    val_list: str = opt("", doc="text file naming the validation images (overrides val_fraction)")
    test_fraction: float = opt(
        0.2,
        0.0,
        0.9,
        doc="folders, manifest and patterns layouts without train_list: share of good images "
        "(groups) held out as test-good",
    )
    seed: int = opt(0, 0, None)
    defective_groups: Literal["test", "split"] = opt(
        "test",
        doc="a group holding a defective image: all to test, or split by fraction like the rest "
        "(its defective images left out of train and validation)",
    )
    download_url: str = opt("", doc="archive URL for `prepare --download` (users with internet)")
    download_sha256: str = opt("", doc="expected SHA-256 of the archive")
    folders: FoldersOptions = opt(FoldersOptions())
    aitex: AitexOptions = opt(AitexOptions())
    synthetic: SyntheticOptions = opt(SyntheticOptions())
    manifest: ManifestOptions = opt(ManifestOptions())
    patterns: PatternsOptions = opt(PatternsOptions())

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelConfig:
    """The model family, the patch size it is built for, and its family-specific arguments."""

    name: str = opt("", doc="model profile name (filled in by the loader)")
    family: str = opt("ae", doc="a registered family: see `defectae models`")
    input_size: int = opt(128, 8, 4096, doc="side of the square patch the model sees")
    args: dict[str, Any] = opt(
        {}, doc="family-specific constructor arguments (checked by the family)"
    )


@dataclass(frozen=True)
class LossConfig:
    """total = alpha*recon + kld_weight*KL + beta*ssim_term + sparse_weight*sparse
    + perceptual_weight*perceptual."""

    recon: Literal[
        "mse", "l1", "ssim", "msssim", "frequency", "logfrequency", "hybrid", "hybrid_spatial"
    ] = opt("mse", doc="reconstruction term")
    alpha: float = opt(1.0, 0.0, None, doc="weight of the reconstruction term")
    beta: float = opt(0.0, 0.0, None, doc="weight of an extra 1-SSIM term")
    kld_weight: float = opt(0.0, 0.0, None, doc="weight of the KL term (VAEs)")
    kl_warmup_epochs: int = opt(
        0, 0, None, doc="linear warm-up of kld_weight over this many epochs"
    )
    sparse_weight: float = opt(0.0, 0.0, None, doc="weight of L1 on the latent code")
    ssim_window: int = opt(11, 3, 31, doc="SSIM window size (odd)")
    frequency_weight: float = opt(1.0, 0.0, None, doc="weight of the FFT term inside hybrid losses")
    corruption_weight: float = opt(
        1.0, 0.0, None, doc="extra weight on corrupted pixels for denoising models (1 = none)"
    )
    perceptual_weight: float = opt(
        0.0,
        0.0,
        None,
        doc="weight of the feature distance between reconstruction and input under a frozen "
        "pretrained encoder (pixel models); 0 = off",
    )
    perceptual_backbone: Backbone = opt(
        "efficientnet-lite0",
        doc="encoder of the perceptual term (models.backbones); efficientnet-lite0 works offline, "
        "the others (vgg16: the classic choice) download their weights on first use",
    )
    perceptual_weights: str = opt(
        "", doc="state dict path for machines without internet; empty: the backbone's own"
    )


@dataclass(frozen=True)
class AugmentConfig:
    """How `augment` samples training patches from prepared images."""

    n_patches: int = opt(10000, 1, None, doc="training patches to write")
    n_val_patches: int = opt(1000, 1, None, doc="validation patches, from validation images only")
    whole_image: bool = opt(
        False, doc="no cropping: a patch is the whole image (needs input_size = image size)"
    )
    sampling: Literal["even", "uniform-origin"] = opt(
        "even",
        doc="crop placement: even covers border and centre pixels alike; uniform-origin "
        "(the old default) covers a corner pixel ~input_size times less often than the centre",
    )
    reflect_pad: int = opt(
        0,
        0,
        None,
        doc="reflect-pad each image by this many pixels before cropping, so patches show the "
        "mirror seams tile.border_pad makes at test time (for families that flag them: draem)",
    )
    rotation_prob: float = opt(0.0, 0.0, 1.0)
    max_angle: float = opt(
        0.0, 0.0, 180.0, doc="rotate by up to +-angle, then crop the largest inscribed square"
    )
    hflip_prob: float = opt(0.0, 0.0, 1.0)
    vflip_prob: float = opt(0.0, 0.0, 1.0)
    jitter_prob: float = opt(0.0, 0.0, 1.0, doc="probability of brightness/contrast jitter")
    brightness: float = opt(0.0, 0.0, 1.0, doc="additive brightness range +-")
    contrast: float = opt(0.0, 0.0, 1.0, doc="multiplicative contrast range 1+-")
    noise_prob: float = opt(0.0, 0.0, 1.0)
    noise_std: float = opt(0.0, 0.0, 1.0, doc="Gaussian noise sigma in [0, 1] intensity units")
    compression: Literal["none", "lzf", "gzip"] = opt("none")
    chunk_patches: int = opt(64, 1, 4096, doc="patches per HDF5 chunk")
    seed: int = opt(0, 0, None)


@dataclass(frozen=True)
class CorruptionConfig:
    """Corruptions applied at training time for denoising models (dae, daee); not stored."""

    kind: Literal["none", "dominant_square", "random_square", "noise_block", "perlin"] = opt("none")
    prob: float = opt(1.0, 0.0, 1.0, doc="probability that a patch is corrupted")
    size: int = opt(20, 1, None, doc="square side in pixels")
    count: int = opt(1, 1, 64, doc="squares per patch")
    noise_std: float = opt(0.2, 0.0, 1.0, doc="sigma of the noise block")
    perlin_scale: int = opt(4, 1, 64, doc="Perlin grid cells per patch side")
    perlin_threshold: float = opt(0.5, 0.0, 1.0)
    perlin_min_scale: int = opt(
        0,
        0,
        64,
        doc="smallest Perlin grid cells per side: each patch draws a power of two between this and "
        "perlin_scale per axis, as DRAEM; 0 = always perlin_scale",
    )
    source: Literal["fractal", "procedural", "images", "folder", "mixed"] = opt(
        "fractal",
        doc="foreign texture of perlin: fractal (as before), procedural, images (the batch's), "
        "folder (anomaly_source_dir) or mixed",
    )
    anomaly_source_dir: str = opt(
        "",
        doc="folder of images (e.g. DTD) for source folder, and mixed when set; relative paths are "
        "relative to the current directory",
    )


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's knobs."""

    epochs: int = opt(50, 1, None)
    batch_size: int = opt(128, 1, None)
    optimizer: Literal["adam", "adamw"] = opt("adam")
    lr: float = opt(2e-4, 0.0, None)
    weight_decay: float = opt(0.0, 0.0, None)
    scheduler: Literal["cosine", "step", "none"] = opt("cosine")
    warmup_epochs: int = opt(0, 0, None)
    step_size: int = opt(10, 1, None, doc="epochs between decays (step scheduler)")
    gamma: float = opt(0.5, 0.0, 1.0, doc="decay factor (step scheduler)")
    grad_clip: float = opt(0.0, 0.0, None, doc="max gradient norm; 0 = off")
    amp: Literal["auto", "bf16", "fp16", "off"] = opt("auto")
    compile: bool = opt(True)
    patience: int = opt(10, 0, None, doc="epochs without improvement before stopping; 0 = off")
    min_delta: float = opt(0.0, 0.0, None)
    num_workers: int = opt(2, 0, 64)
    seed: int = opt(0, 0, None)
    device: str = opt("auto", doc="auto, cpu, cuda or cuda:N")
    log_images_every: int = opt(
        5, 0, None, doc="epochs between reconstruction images in TensorBoard; 0 = off"
    )
    n_log_images: int = opt(8, 1, 64)
    histograms: bool = opt(False, doc="weight histograms in TensorBoard")
    deterministic: bool = opt(False, doc="torch deterministic algorithms (slower)")
    max_minutes: float = opt(
        0.0,
        0.0,
        None,
        doc="time budget of one `train` call: stop cleanly after the step that reaches it "
        "(status time-limit, --resume continues); 0 = off",
    )
    find_batch_max: int = opt(
        4096,
        1,
        None,
        doc="largest batch --find-batch-size tries (on CPU also at most half the free RAM)",
    )


@dataclass(frozen=True)
class TileConfig:
    """Sliding-window reconstruction, residual maps and the image score."""

    stride: int = opt(32, 1, None)
    batch_size: int = opt(64, 1, None, doc="patches per forward pass")
    residual: dict[str, float] = opt({"ssim": 1.0}, doc="weights of ssim, l2, l1, msssim residuals")
    ssim_window: int = opt(11, 3, 31)
    ssim_gaussian: bool = opt(True, doc="Gaussian (sigma 1.5) or uniform SSIM window")
    ssim_sigma: float = opt(1.5, 0.1, 10.0)
    ssim_k1: float = opt(0.01, 0.0, 1.0)
    ssim_k2: float = opt(0.03, 0.0, 1.0)
    fusion: Literal["gaussian", "uniform"] = opt(
        "gaussian", doc="weight of tile pixels when overlapping tiles are averaged"
    )
    border_pad: int = opt(
        -1,
        -1,
        None,
        doc="reflect-pad images by this many pixels before tiling, so border pixels sit inside tiles; -1 = half a patch plus the residual filters' reach, 0 = off",
    )
    smooth_sigma: float = opt(0.0, 0.0, 50.0, doc="Gaussian smoothing of the residual map; 0 = off")
    normalize: Literal["none", "global", "pixel"] = opt(
        "none",
        doc="maps as z-scores of the good validation maps: one mean/std, or one per pixel (aligned objects)",
    )
    normalize_floor: float = opt(
        0.1, 0.0, 10.0, doc="pixel normalisation: std floor, as a fraction of the global std"
    )
    score: Literal["max", "topk", "area"] = opt(
        "max",
        doc="image score: max of the map, mean of its top k%, or share of pixels above area_threshold",
    )
    topk_percent: float = opt(1.0, 0.001, 100.0)
    area_threshold: float = opt(
        3.0, None, None, doc="score = area: map value counted as anomalous (z-score if normalised)"
    )
    score_margin: int = opt(
        0, 0, None, doc="pixels at the image border the image score ignores (the map keeps them)"
    )
    save_reconstructions: bool = opt(True)
    amp: Literal["auto", "bf16", "fp16", "off"] = opt("auto")
    compile: bool = opt(False)
    device: str = opt("auto")

    def residual_options(self) -> dict[str, Any]:
        """Keyword arguments of `core.residuals.residual_map`."""
        return {
            "residual": dict(self.residual),
            "ssim_window": self.ssim_window,
            "ssim_gaussian": self.ssim_gaussian,
            "ssim_sigma": self.ssim_sigma,
            "ssim_k1": self.ssim_k1,
            "ssim_k2": self.ssim_k2,
            "smooth_sigma": self.smooth_sigma,
        }

    def score_options(self) -> dict[str, Any]:
        """Keyword arguments of `core.residuals.image_scores`."""
        return {
            "score": self.score,
            "topk_percent": self.topk_percent,
            "area_threshold": self.area_threshold,
            "margin": self.score_margin,
        }

    def inspector_options(self) -> dict[str, Any]:
        """The settings that turn reconstructions into maps and scores, as the Inspector takes them."""
        return {
            "stride": self.stride,
            "fusion": self.fusion,
            "border_pad": self.border_pad,
            "residual_options": self.residual_options(),
            "score_options": self.score_options(),
        }


@dataclass(frozen=True)
class ScoreConfig:
    """Thresholds and report settings of `score`."""

    threshold: Literal["val_quantile", "val_fpr"] = opt(
        "val_quantile", doc="how the label-free threshold is chosen"
    )
    quantile: float = opt(0.999, 0.0, 1.0, doc="quantile of validation residuals")
    target_fpr: float = opt(0.01, 0.0, 1.0, doc="target pixel FPR on validation images")
    pro_max_fpr: float = opt(0.3, 0.0, 1.0, doc="FPR limit of AU-PRO")
    resolution: Literal["original", "prepared"] = opt(
        "original",
        doc="pixel metrics at each test image's original size (maps upsampled, as the MVTec AD "
        "evaluation) or on the prepared grid; --resolution overrides it",
    )
    panels: bool = opt(True, doc="write a figure panel per test image")
    panel_size: int = opt(
        256, 32, 2048, doc="longest side of each image in a report panel, in pixels"
    )
    image_score: Literal["residual", "latent"] = opt(
        "residual",
        doc="image score: from the residual map (tile.score), or, for VAE families, the "
        "Mahalanobis distance of the image's latent mean to the good training images' codes",
    )

    def threshold_options(self) -> dict[str, Any]:
        """Keyword arguments of `core.metrics.label_free_threshold`."""
        return {
            "threshold": self.threshold,
            "quantile": self.quantile,
            "target_fpr": self.target_fpr,
        }

    def metric_options(self) -> dict[str, Any]:
        """Keyword arguments of `core.metrics.compute_all` that come from the profile."""
        return {**self.threshold_options(), "pro_max_fpr": self.pro_max_fpr}


@dataclass(frozen=True)
class Profile:
    """A fully resolved profile: one dataset and one model with all their settings."""

    name: str = opt("")
    dataset: DatasetConfig = opt(DatasetConfig())
    model: ModelConfig = opt(ModelConfig())
    loss: LossConfig = opt(LossConfig())
    augment: AugmentConfig = opt(AugmentConfig())
    corruption: CorruptionConfig = opt(CorruptionConfig())
    train: TrainConfig = opt(TrainConfig())
    tile: TileConfig = opt(TileConfig())
    score: ScoreConfig = opt(ScoreConfig())


MODEL_SECTIONS = ("model", "loss", "augment", "corruption", "train", "tile", "score")
