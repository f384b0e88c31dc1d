"""Data-path benchmarks: the training loader's images/s, PIL decode vs the uint8 canvas cache.

``distortkd-bench data`` times ``ImageDataModule``'s train loader per worker count on generated
JPEGs; ``distortkd-bench cache`` compares the PIL path with ``data.cache=uint8`` (loader alone, and
with the crop ``to_images`` does); ``distortkd-bench gpu`` reuses the parquet writer and the
device-side stream timer. Kept apart from ``bench`` because it imports the data stack (Lightning).
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distortkd.data import ImageDataModule
from distortkd.errors import UserError
from distortkd.sources import DATASETS
from distortkd.timing import Bench, Result


def write_imagefolder(root: Path, n: int, classes: int, size=(500, 400)) -> Path:
    """Writes ``n`` random-texture JPEGs (~500×400) in ``classes`` folders under ``root/train``."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        # Upsampled noise compresses like a photo (tens of KB), unlike white noise.
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def cmd_data(b: Bench) -> tuple[list[Result], dict]:
    """Images/s of the training DataLoader of ``ImageDataModule`` per worker count."""
    classes = DATASETS["imagenet100"].num_classes  # the spec refuses any other class count
    if b.args.num_images < classes:
        raise UserError(f"--num-images {b.args.num_images} leaves imagenet100 classes empty; "
                        f"accepted: >= {classes}")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_imagefolder(Path(tmp) / "images", b.args.num_images, classes)
        for workers in b.args.workers:
            dm = ImageDataModule("imagenet100", path=str(root), image_size=b.args.img_size,
                                 batch_size=b.args.batch, num_workers=workers,
                                 pin_memory=b.device.type == "cuda", cache_dir=f"{tmp}/cache")
            res[f"workers={workers}"] = time_loader(b, dm.train_dataloader())
    return list(res.values()), {"images": b.args.num_images, "classes": classes,
                                "source": "generated JPEG imagefolder, ~500x400, decoded by PIL"}


def time_loader(b: Bench, loader) -> Result:
    """Times ``--iters`` batches after ``--warmup`` (worker start-up), looping over epochs.
    Read ``stream_img/s`` (images / total time): workers prefetch, so one batch's time means little."""
    it = (batch for _ in iter(int, 1) for batch in loader)  # endless; workers persist
    for _ in range(max(1, b.args.warmup)):
        next(it)
    ms, n, start = [], 0, time.perf_counter()
    for _ in range(b.args.iters):
        t0 = time.perf_counter()
        n += len(next(it)["image"])
        ms.append((time.perf_counter() - t0) * 1e3)
    extra = {"stream_img/s": n / (time.perf_counter() - start)}
    return Result(f"workers={loader.num_workers}", loader.batch_size, ms, b.peak_mib(), extra=extra)


def jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A random-texture JPEG of ``size`` (w, h): upsampled noise compresses like a photo."""
    small = rng.integers(0, 256, (max(1, size[1] // 8), max(1, size[0] // 8), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_parquet(root: Path, rows: int, distinct: int, jpeg_size: tuple[int, int]) -> Path:
    """ImageNet-100 in the hub layout (``data/{train,validation}-00000-of-00001.parquet``, image
    bytes + ``ClassLabel``): ``rows`` train rows, ``distinct`` JPEGs of ``jpeg_size`` among them
    (decoding costs the same; encoding is slow), and one validation row per class."""
    spec, rng = DATASETS["imagenet100"], np.random.default_rng(0)
    pool = [jpeg(rng, jpeg_size) for _ in range(distinct)]
    features = datasets.Features({spec.image_key: datasets.Image(),
                                  spec.label_key: datasets.ClassLabel(num_classes=spec.num_classes)})
    for split, n in (("train", rows), ("validation", spec.num_classes)):
        rows = {spec.image_key: [{"bytes": pool[i % len(pool)], "path": None} for i in range(n)],
                spec.label_key: [i % spec.num_classes for i in range(n)]}
        table = datasets.Dataset.from_dict(rows, features=features)
        (root / "data").mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def stream_ips(loader, device: torch.device, batches: int, to_images: Callable | None) -> float:
    """Images/s of ``batches`` batches moved to ``device`` (and cropped there by ``to_images``),
    after one epoch that starts the (persistent) workers."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def take(batch):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return to_images(batch, train=True) if to_images else batch

    for batch in loader:
        take(batch)
    sync()
    it = (batch for _ in iter(int, 1) for batch in loader)  # endless; workers persist
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        n += len(take(next(it))["image"])
    sync()
    return n / (time.perf_counter() - start)


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


def cache_bench(n: int, workers: list[int], batch: int, image_size: int, repeats: int,
          batches: int) -> None:
    """Prints training-loader images/s, PIL path vs uint8 cache, per worker count (medians)."""
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
