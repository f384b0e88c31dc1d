"""``data.cache=uint8``: a split decoded once into a uint8 canvas file, read back as plain bytes.

The canvas of an image is its shorter side resized to ``S`` (PIL bilinear, as the eval path) and
the centred ``S × S`` square, so a split is one array ``[N, C, S, S]`` (ImageNet-100 at S=256:
126.7k × 3 × 256² ≈ 25 GB). Training crops are drawn from the canvas, not the full image: the
long side's margins are gone (a quarter of a 4:3 photo) and a small RandomResizedCrop is upsampled
from canvas pixels. Eval crops are exact: at the default ``S = floor(image_size / crop_pct)``
the canvas holds the very pixels that ``Resize(S)`` leaves for ``CenterCrop(image_size)``, sliced
out when ``S - image_size`` is even (224 of 256); an odd difference centres the crop half a pixel
off PIL's rounded offset (bilinear). The sidecar checks rows, split and labels, not pixels: delete
the folder after editing images in place.

On disk, one folder per (dataset, source, split, S, channels) under
``<cache_dir or HF_DATASETS_CACHE>/distortkd-uint8/``: ``images.u8`` (raw bytes, C order),
``valid.npy`` (bool ``[N]``, False where the image was undecodable) and ``meta.json`` (the sidecar:
version, source, split, row count, label hash, shape). Each is written to ``<file>.tmp``, fsynced
and renamed, the sidecar last, and a rebuild first deletes the old sidecar: a folder is trusted
only when its sidecar matches, so a killed build is never read.

``distortkd-bench cache --n 512`` (``distortkd.bench_data``) times the training loader before (PIL
in workers) and after (canvases + ``BatchTransform`` in the main process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from distortkd.errors import UserError

log = logging.getLogger(__name__)

VERSION = 2  # 2: decoded by distortkd.images (16-bit scaled, EXIF upright); 1's canvases rebuild
KINDS = (None, "uint8")  # accepted values of data.cache
IMAGES, VALID, SIDECAR = "images.u8", "valid.npy", "meta.json"


def default_side(image_size: int, crop_pct: float, small: bool) -> int:
    """Canvas side S: the eval resize of ``pil_transform`` (``image_size`` for small datasets)."""
    return image_size if small else math.floor(image_size / crop_pct)


def folder(cache_dir: str | None, name: str, source: str, split: str, side: int, chans: int) -> Path:
    """The cache folder of one split: keyed by dataset, source (path or hub id), split, S, C."""
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser()
    key = hashlib.sha1(source.encode()).hexdigest()[:12]
    return root / "distortkd-uint8" / name / f"{split}-{side}px-{chans}ch-{key}"


def sidecar(name: str, source: str, split: str, labels: np.ndarray, side: int, chans: int) -> dict:
    """What a trusted cache must hold: a changed source (rows, labels, order) or S rebuilds it."""
    return {"version": VERSION, "dataset": name, "source": source, "split": split,
            "rows": len(labels), "labels_sha1": hashlib.sha1(labels.tobytes()).hexdigest(),
            "shape": [len(labels), chans, side, side],
            "canvas": "shorter side resized to S (PIL bilinear), centred S x S crop"}


def _trusted(where: Path, meta: dict) -> bool:
    try:
        found = json.loads((where / SIDECAR).read_text())
    except (OSError, ValueError):
        return False
    nbytes = math.prod(meta["shape"])
    return ({k: found.get(k) for k in meta} == meta and (where / VALID).exists()
            and (where / IMAGES).exists() and (where / IMAGES).stat().st_size == nbytes)


def _commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and rename it to ``path``: the rename never reaches the disk before the data."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _whole(batch):  # batches come whole from HFImages.__getitems__
    return batch


def load_or_build(where: Path, meta: dict, rows: Dataset, num_workers: int) -> np.ndarray:
    """Validity mask ``[N]`` of the cache in ``where``, built first unless its sidecar matches.

    ``rows``: an ``imagesets.HFImages`` over the whole split with a ``canvas_transform``; its ``bad``
    flags and ``max_bad_fraction`` apply as on the lazy path. Decoding runs in ``num_workers``.
    """
    if not _trusted(where, meta):
        _build(where, meta, rows, num_workers)
    return np.load(where / VALID)


def _build(where: Path, meta: dict, rows: Dataset, num_workers: int, batch: int = 64) -> None:
    n, shape = meta["rows"], meta["shape"]
    where.mkdir(parents=True, exist_ok=True)
    (where / SIDECAR).unlink(missing_ok=True)  # untrusted from here until the new sidecar lands
    _fsync_dir(where)
    nbytes, free = math.prod(shape), shutil.disk_usage(where).free
    if nbytes > free:
        raise UserError(f"data.cache=uint8 needs {nbytes / 1e9:.1f} GB for {meta['dataset']} "
                        f"{meta['split']} {shape}; {where} has {free / 1e9:.1f} GB free (set "
                        "data.cache_dir, or a smaller data.cache_size)")
    log.info("data.cache: decoding %d images of %s %s into %s", n, meta["dataset"],
             meta["split"], where)
    start, tmp = time.perf_counter(), where / f"{IMAGES}.tmp"
    loader = DataLoader(rows, batch, num_workers=num_workers, collate_fn=_whole)
    try:
        with open(tmp, "wb") as f:  # sequential writes: a full disk is an OSError, not a SIGBUS
            for k, got in enumerate(loader):  # in order, batch k = rows [k * batch, ...)
                out = np.zeros((min(batch, n - k * batch), *shape[1:]), np.uint8)
                if len(got["index"]):
                    out[got["index"].numpy() - k * batch] = got["image"].numpy()
                f.write(out.data)
        _commit(tmp, where / IMAGES)
        valid = ~rows.bad.numpy()
        with open(where / f"{VALID}.tmp", "wb") as f:
            np.save(f, valid)
        _commit(where / f"{VALID}.tmp", where / VALID)
        (where / f"{SIDECAR}.tmp").write_text(json.dumps({**meta, "bad": int((~valid).sum())}))
        _commit(where / f"{SIDECAR}.tmp", where / SIDECAR)
        _fsync_dir(where)
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # tens of GB; an interrupted build restarts from scratch
        if isinstance(err, UserError):  # from a worker: its message, not the worker's traceback
            last = str(err).strip().splitlines()[-1]
            raise UserError(last.removeprefix(f"{UserError.__module__}.UserError: ")) from None
        raise
    log.info("data.cache: %d images in %.0f s", n, time.perf_counter() - start)


class CanvasImages(Dataset):
    """A split's canvases, memory-mapped: ``shape`` ``[N, C, S, S]`` uint8, ``labels [N]``,
    ``index`` picks rows. Batches are ``{"image": uint8 [B, C, S, S], "label", "index"}``: workers
    only copy bytes; ``ImageDataModule.on_after_batch_transfer`` crops them on the device."""

    def __init__(self, path: Path, shape: list[int], labels, index):
        self.path, self.shape, self._images = str(path), tuple(shape), None
        self.labels = torch.as_tensor(labels)
        self.index = torch.as_tensor(index, dtype=torch.int64)

    def __getstate__(self) -> dict:  # each worker maps the file itself; never pickle the pages
        return {**self.__dict__, "_images": None}

    @property
    def images(self) -> np.memmap:
        if self._images is None:
            self._images = np.memmap(self.path, np.uint8, "r", shape=self.shape)
        return self._images

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, positions: list[int]) -> dict[str, Tensor]:
        idx = self.index[torch.as_tensor(positions, dtype=torch.int64)]
        image = torch.from_numpy(np.ascontiguousarray(self.images[idx.numpy()]))
        return {"image": image, "label": self.labels[idx], "index": idx}

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}
