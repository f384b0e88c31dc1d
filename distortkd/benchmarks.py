"""The published pre-corrupted benchmarks read from disk: CIFAR-10-C, CIFAR-100-C and ImageNet-C
(Hendrycks & Dietterich, ICLR 2019), and the benchmark's own corruption error.

The published files went through uint8 and (ImageNet-C) JPEG after every corruption, so they
differ from the suite that :mod:`distortkd.corruptions` regenerates on the fly; papers report on
these files. Layouts, as downloaded:

* CIFAR-10-C / CIFAR-100-C: one folder with ``<corruption>.npy`` (uint8 ``[5 N, 32, 32, 3]``: the
  N test images at severity 1, then 2, ..., 5) and ``labels.npy`` (``[5 N]``, or ``[N]``).
* ImageNet-C: ``<corruption>/<severity 1..5>/<wnid>/*.JPEG`` (224 × 224, already the eval crop).
  For ImageNet-100 only the CMC classes (``sources.DATASETS["imagenet100"].class_list``) are
  kept, labelled in that list's order; other wnids are skipped and counted.

Cells come out as loaders of clean-format batches (``{"image": [B, C, S, S] float32 in [0, 1],
"label", "index"}``) built with the datamodule's own eval transforms, so a fine-tuned model is
tested on them exactly as on the clean test split, with no distortion on top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from distortkd import sources
from distortkd.errors import UserError
from distortkd.imagesets import HFImages, TensorImages, collate
from distortkd.splits import first_k
from distortkd.transforms import BatchTransform, pil_transform

LEVELS = (1, 2, 3, 4, 5)
# The 15 corruptions the benchmark's mCE averages over, in ImageNet-C's order.
BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression")
# The 4 "validation" corruptions published beside them (not part of the mCE).
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
# AlexNet's error on ImageNet-C per corruption, averaged over the 5 severities: the mCE's
# normaliser. The raw AlexNet errors of github.com/hendrycks/robustness, as AugMix's imagenet.py
# (github.com/google-research/augmix) quotes them; Hendrycks & Dietterich 2019, Table 2 / appendix.
ALEXNET_ERR: dict[str, float] = dict(zip(BENCHMARK_CORRUPTIONS, (
    0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816, 0.826572,
    0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500), strict=True))
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class Benchmark:
    """One published benchmark: its name, the clean dataset (``data.name``) whose test images it
    corrupts, and its layout on disk (``npy`` or ``folders``)."""

    title: str
    dataset: str
    layout: str


BENCHMARKS: dict[str, Benchmark] = {
    "cifar10c": Benchmark("CIFAR-10-C", "cifar10", "npy"),
    "cifar100c": Benchmark("CIFAR-100-C", "cifar100", "npy"),
    "imagenet_c": Benchmark("ImageNet-C", "imagenet100", "folders"),
}


def mce_vs_alexnet(errors: Mapping[str, Sequence[float]]) -> tuple[float, dict[str, float]]:
    """ImageNet-C's mCE: ``CE_c = 100 · Σ_s err(c, s) / Σ_s err_AlexNet(c, s)``, mean over the 15
    benchmark corruptions.

    Args:
        errors: top-1 error in ``[0, 1]`` per severity 1..5, per corruption name.

    Returns:
        The mCE (NaN unless all 15 have all 5 severities) and ``CE_c`` of every benchmark corruption
        with all 5 severities (others, e.g. the extra four, have no AlexNet reference).
    """
    ce = {c: 100 * sum(errors[c]) / (len(LEVELS) * ALEXNET_ERR[c]) for c in BENCHMARK_CORRUPTIONS
          if c in errors and _complete(errors[c])}
    return _mean_of_all(ce), ce


def mean_corruption_error(errors: Mapping[str, Sequence[float]]) -> tuple[float, dict[str, float]]:
    """CIFAR-10-C / CIFAR-100-C's measure (Hendrycks et al., AugMix, 2020): the unnormalised
    error ×100 averaged over severities, then over the 15 benchmark corruptions (AlexNet's errors
    are ImageNet-C's, so they normalise nothing here). Same arguments and returns as
    :func:`mce_vs_alexnet`."""
    ce = {c: 100 * float(np.mean(errors[c])) for c in BENCHMARK_CORRUPTIONS
          if c in errors and _complete(errors[c])}
    return _mean_of_all(ce), ce


def _complete(errs: Sequence[float]) -> bool:
    return len(errs) == len(LEVELS) and all(math.isfinite(e) for e in errs)


def _mean_of_all(ce: dict[str, float]) -> float:
    return float(np.mean(list(ce.values()))) if len(ce) == len(BENCHMARK_CORRUPTIONS) else math.nan


def corruptions(extra: bool) -> tuple[str, ...]:
    """The corruptions a benchmark suite evaluates: the 15, and the extra 4 with ``extra``."""
    return BENCHMARK_CORRUPTIONS + (EXTRA_CORRUPTIONS if extra else ())


def cells(extra: bool) -> list[tuple[str, int]]:
    """``(corruption, severity)`` of every cell, severities 1..5 within each corruption."""
    return [(name, level) for name in corruptions(extra) for level in LEVELS]


def _class_list(dataset: str) -> list[str]:
    spec = sources.DATASETS[dataset]
    return (Path(sources.__file__).parent / spec.class_list).read_text().split() if spec.class_list else []


class StoredCells:
    """The cells of benchmark ``suite`` under ``path``, checked on construction (one-line
    ``UserError`` naming what is missing or wrong); :meth:`loader` gives a cell's batches.

    Args:
        suite: a key of ``BENCHMARKS``. path: the benchmark's folder. dataset: ``data.name``.
        extra: also the 4 extra corruptions. in_chans: the model's channels (1: to grayscale).
    """

    def __init__(self, suite: str, path: str | None, dataset: str, extra: bool, in_chans: int = 3):
        self.bench, self.in_chans = BENCHMARKS[suite], in_chans
        if dataset != self.bench.dataset:
            raise UserError(f"suite={suite!r} corrupts the {self.bench.dataset} test split; got "
                            f"data={dataset}; accepted: data={self.bench.dataset}")
        if path is None or not Path(path).expanduser().is_dir():
            raise UserError(f"benchmark.path={path!r} is not a folder; accepted: the {self.bench.title} "
                            f"folder ({_LAYOUT[self.bench.layout]})")
        self.root, self.names = Path(path).expanduser(), corruptions(extra)
        self.num_classes = sources.DATASETS[dataset].num_classes
        self.skipped: dict[str, int] = {}  # class folder -> images skipped (not the dataset's classes)
        self._check_missing()
        if self.bench.layout == "npy":
            self.labels = self._npy_labels()
            self._check_npy_lengths()
        else:  # a cell's files are listed when it is read: ImageNet-C holds ~4M of them
            self.classes = {w: i for i, w in enumerate(_class_list(dataset))}

    def _check_missing(self) -> None:
        """Names every missing corruption file / severity folder, and what was found."""
        if self.bench.layout == "npy":
            wanted = [f"{n}.npy" for n in self.names] + ["labels.npy"]
            found = sorted(p.name for p in self.root.glob("*.npy"))
        else:
            wanted = [f"{n}/{s}" for n in self.names for s in LEVELS]
            found = sorted(f"{p.parent.name}/{p.name}" for p in self.root.glob("*/*") if p.is_dir())
        missing = [w for w in wanted if not (self.root / w).exists()]
        if missing:
            hint = ("; or benchmark.extra=false to evaluate only the 15 benchmark corruptions"
                    if all(m.split(".")[0].split("/")[0] in EXTRA_CORRUPTIONS for m in missing) else "")
            raise UserError(f"{self.bench.title} folder {str(self.root)!r} lacks {_listing(missing)}; "
                            f"found: {_listing(found) or 'nothing'}{hint}")

    def _npy_labels(self) -> np.ndarray:
        labels = _load(self.root / "labels.npy")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{self.root / 'labels.npy'} holds {labels.dtype} {list(labels.shape)}; "
                            "accepted: integer labels [N] or [5 N]")
        if len(labels) and not 0 <= labels.min() <= labels.max() < self.num_classes:
            raise UserError(f"{self.root / 'labels.npy'} holds labels in [{labels.min()}, {labels.max()}]; "
                            f"accepted for {self.bench.title}: 0..{self.num_classes - 1}")
        return labels.astype(np.int64)

    def _images(self, name: str) -> np.ndarray:
        """``<name>.npy`` memory-mapped: uint8 ``[5 N, H, W, C]`` (a cell reads only its block)."""
        return _load(self.root / f"{name}.npy", mmap_mode="r")

    def _check_npy_lengths(self) -> None:
        for name in self.names:
            images, file = self._images(name), self.root / f"{name}.npy"
            if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
                raise UserError(f"{file} holds {images.dtype} {list(images.shape)}; accepted: uint8 "
                                "[5 N, H, W, 3] (5 severities × N test images)")
            n = len(self.labels)
            if len(images) not in (n, 5 * n) or len(images) % 5:
                raise UserError(f"{file} holds {len(images):,} images; accepted: 5 severities × the "
                                f"labels of labels.npy ({n:,} labels: {5 * n:,} images, or {n:,} "
                                "when labels.npy repeats them per severity)")

    def _scan(self, name: str, level: int) -> list[tuple[Path, int]]:
        """``(file, label)`` of a cell's images in class folders of the dataset's classes; images of
        other class folders are counted in ``skipped``."""
        out = []
        for folder in sorted(p for p in (self.root / name / str(level)).iterdir() if p.is_dir()):
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if folder.name in self.classes:
                out += [(f, self.classes[folder.name]) for f in files]
            else:
                self.skipped[folder.name] = self.skipped.get(folder.name, 0) + len(files)
        if not out:
            raise UserError(f"{self.root / name / str(level)} holds no images of the "
                            f"{self.bench.dataset} classes; accepted: <wnid>/*.JPEG folders")
        return out

    def describe_skipped(self) -> str | None:
        """One line on the class folders left out (None: none)."""
        if not self.skipped:
            return None
        names = sorted(self.skipped)
        return (f"{self.bench.title}: skipped {sum(self.skipped.values()):,} images in {len(names)} class "
                f"folders not among {self.bench.dataset}'s {self.num_classes} classes "
                f"(e.g. {', '.join(names[:3])})")

    def loader(self, name: str, level: int, datamodule) -> DataLoader:
        """The cell's batches through ``datamodule``'s eval transform, batch size and workers;
        ``data.limit_eval`` keeps the same first-K images as for the clean test split."""
        h = datamodule.hparams
        small = datamodule.spec.small
        dataset = self._npy_cell(name, level, h, small) if self.bench.layout == "npy" else \
            self._folder_cell(name, level, h)
        return DataLoader(dataset, h.eval_batch_size or h.batch_size, num_workers=h.num_workers,
                          pin_memory=h.pin_memory, collate_fn=collate)

    def _npy_cell(self, name: str, level: int, h, small: bool) -> TensorImages:
        images = self._images(name)
        n = len(images) // 5
        block = torch.from_numpy(np.array(images[(level - 1) * n: level * n]))  # a writable copy
        block = block.permute(0, 3, 1, 2).contiguous()  # [N, C, H, W], as TensorImages holds splits
        if self.in_chans == 1 and block.shape[1] == 3:
            block = TF.rgb_to_grayscale(block)  # the same ITU-R 601 weights as PIL's "L"
        labels = self.labels if len(self.labels) == n else self.labels[(level - 1) * n: level * n]
        transform = BatchTransform(h.image_size, h.crop_pct, small, False, tuple(h.rrc_scale), self.in_chans)
        return TensorImages(block, labels, first_k(np.arange(n), h.limit_eval, 0), transform)

    def _folder_cell(self, name: str, level: int, h) -> HFImages:
        files = self._scan(name, level)
        feats = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": None, "path": str(f)} for f, _ in files], "label": [y for _, y in files]},
            features=feats)
        labels = np.array([y for _, y in files], np.int64)
        # crop_pct 1: the files are the eval crop already (224 × 224 of a 256 resize); the
        # benchmark's own test.py only centre-crops them, so no second 0.875 crop here.
        transform = pil_transform(h.image_size, 1.0, False, False, tuple(h.rrc_scale))
        index = first_k(np.arange(len(files)), h.limit_eval, 0)
        mode = "L" if self.in_chans == 1 else "RGB"
        return HFImages(table, "image", labels, index, transform, mode, h.max_bad_fraction,
                        f"{self.bench.title} {name}/{level}")


def stored_cells(cfg) -> StoredCells | None:
    """The published files of an evaluate config's ``suite`` (cifar10c, cifar100c, imagenet_c),
    checked; None for the other suites."""
    if cfg.suite not in BENCHMARKS:
        return None
    extra = cfg.benchmark.extra
    if not isinstance(extra, bool):
        raise UserError(f"benchmark.extra={extra!r} is not accepted; accepted: true, false")
    return StoredCells(cfg.suite, cfg.benchmark.path, cfg.data.name, extra, cfg.model.in_chans)


def _load(file: Path, mmap_mode: str | None = None) -> np.ndarray:
    """A ``.npy`` file; one that numpy cannot read (cut off, not .npy, pickled) is a ``UserError``."""
    try:
        return np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"{file} is not a readable .npy array ({' '.join(str(err).split())[:120]}); "
                        "re-download it") from None


def _listing(items: list[str], most: int = 20) -> str:
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


_LAYOUT = {"npy": "<corruption>.npy and labels.npy", "folders": "<corruption>/<severity>/<wnid>/*.JPEG"}
