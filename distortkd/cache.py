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

``python -m distortkd.cache bench --n 512`` times the training loader before (PIL in workers) and
after (canvases + ``BatchTransform`` in the main process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
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

    ``rows``: a ``data.HFImages`` over the whole split with a ``canvas_transform``; its ``bad``
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


def _stream_ips(loader: DataLoader, batches: int, transform=None) -> tuple[float, float]:
    """Images/s over ``batches`` batches after one (worker start-up), and the share of the time
    spent in ``transform``."""
    it = (b for _ in iter(int, 1) for b in loader)  # endless; workers persist
    next(it)
    n, spent, start = 0, 0.0, time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        if transform is not None:
            t0 = time.perf_counter()
            batch = transform(batch)
            spent += time.perf_counter() - t0
        n += len(batch["image"])
    total = time.perf_counter() - start
    return n / total, spent / total


def bench(n: int, workers: list[int], batch: int, image_size: int, repeats: int,
          batches: int) -> None:
    """Prints training-loader images/s, PIL path vs uint8 cache, per worker count (medians)."""
    from distortkd.bench import write_imagefolder
    from distortkd.data import ImageDataModule

    with tempfile.TemporaryDirectory() as tmp:
        root = write_imagefolder(Path(tmp) / "images", n, 100)  # imagenet100: 100 class folders
        kw = dict(path=str(root), image_size=image_size, batch_size=batch, pin_memory=False,
                  cache_dir=f"{tmp}/cache")
        start = time.perf_counter()
        ImageDataModule("imagenet100", cache="uint8", num_workers=max(workers), **kw).dataset("train")
        build = time.perf_counter() - start
        print(f"{n} JPEGs ~500x400 -> {image_size}px, batch {batch}, {batches} batches x "
              f"{repeats} repeats; cache build ({max(workers)} workers): {build:.1f} s; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print("workers | before img/s (PIL) | after: loader only | after: loader + crop | speedup"
              " | crop share")
        for w in workers:
            before, loader, after, share = [], [], [], []
            for _ in range(repeats):
                dm = ImageDataModule("imagenet100", num_workers=w, **kw)
                before.append(_stream_ips(dm.train_dataloader(), batches)[0])
                dm = ImageDataModule("imagenet100", cache="uint8", num_workers=w, **kw)
                loader.append(_stream_ips(dm.train_dataloader(), batches)[0])
                ips, part = _stream_ips(dm.train_dataloader(), batches,
                                        lambda b, dm=dm: dm.to_images(b, train=True))
                after.append(ips)
                share.append(part)
            b, a = statistics.median(before), statistics.median(after)
            print(f"{w:7d} | {b:18.0f} | {statistics.median(loader):18.0f} | {a:20.0f} | "
                  f"{a / b:6.1f}x | {statistics.median(share):.0%}   (ranges: before "
                  f"{min(before):.0f}-{max(before):.0f}, after {min(after):.0f}-{max(after):.0f})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distortkd.cache", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="training loader images/s: PIL path vs uint8 cache")
    b.add_argument("--n", type=int, default=512, help="generated JPEGs (>= 100)")
    b.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--image-size", type=int, default=224)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    args = p.parse_args(argv)
    if args.n < 100:
        raise SystemExit("--n must be >= 100 (imagenet100 has 100 classes)")
    bench(args.n, args.workers, args.batch, args.image_size, args.repeats, args.batches)


if __name__ == "__main__":
    main()
