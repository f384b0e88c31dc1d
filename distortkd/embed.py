"""Embeddings of a folder of images: ``distortkd-embed <model> <image folder> <out>``.

``<model>`` is an exported folder (``config.json``, see ``distortkd.export``), a distill/finetune
checkpoint or a run folder. Images (recursive; jpg/jpeg/png/bmp/webp/tif/tiff) get the run's eval
preprocessing: decoded as training decodes them (``distortkd.images``: 16-bit scaled, EXIF upright),
grey or RGB to match ``in_chans``, the shorter side resized to ``floor(H / crop_pct)``, a centred
``H × W`` crop, values in ``[0, 1]`` (the encoder normalises).

Outputs, rows in the order of the file list:

- ``<out>.npy``: CLS embeddings ``[N, D]`` float32, with ``<out stem>.files.txt`` (one path a line);
- or ``<out>.parquet``: columns ``path`` (string) and ``embedding`` (list<float>);
- with ``--patches``: ``<out stem>.patches.npy``, patch tokens ``[N, num_patches, D]`` (held in memory);
- always ``<out stem>.skipped.txt``: ``path<TAB>reason`` of each undecodable file (maybe empty).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from distortkd import rundir
from distortkd.errors import UserError
from distortkd.images import BadImage, open_image
from distortkd.vit import Encoder

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
OUTPUT_SUFFIXES = (".npy", ".parquet")
MODES = {1: "L", 3: "RGB"}  # in_chans → the PIL mode images are converted to


@dataclass
class Embeddings:
    """What ``embed_files`` computed.

    Attributes:
        files: the embedded images, in row order (undecodable ones left out).
        cls: ``[N, D]`` float32 CLS embeddings (the pooled embedding for non-ViTs).
        patches: ``[N, num_patches, D]`` float32 patch tokens, or None when not asked for.
        skipped: ``(path, reason)`` of each image that could not be decoded.
    """

    files: list[Path]
    cls: np.ndarray
    patches: np.ndarray | None
    skipped: list[tuple[Path, str]]


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension, case-insensitive), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no images in {str(folder)!r}; accepted extensions: {', '.join(IMAGE_SUFFIXES)}")
    return files


def eval_transform(input_size: Sequence[int], crop_pct: float, interpolation: str) -> Callable:
    """PIL image → ``[C, H, W]`` float32 in ``[0, 1]``, as ``distortkd.transforms.pil_transform`` evaluates:
    shorter side resized to ``floor(H / crop_pct)`` pixels, then a centred ``H × W`` crop."""
    _, h, w = input_size
    return v2.Compose([
        v2.Resize(math.floor(h / crop_pct), interpolation=InterpolationMode(interpolation), antialias=True),
        v2.CenterCrop((h, w)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
    ])


class ImageFiles(Dataset):
    """Decodes ``files[i]`` to ``(i, image [C, H, W] or None, reason)``; a bad file never raises."""

    def __init__(self, files: list[Path], transform: Callable, mode: str):
        self.files, self.transform, self.mode = files, transform, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str]:
        try:  # the training path's decode: same pixels, same files refused
            image = open_image(self.files[i], self.mode)
        except BadImage as err:
            return i, None, str(err)
        return i, self.transform(image), ""


def _collate(items: list[tuple[int, Tensor | None, str]]) -> dict:
    good = [(i, x) for i, x, _ in items if x is not None]
    return {"index": [i for i, _ in good], "image": torch.stack([x for _, x in good]) if good else None,
            "bad": [(i, why) for i, x, why in items if x is None]}


@contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``: a rich bar on a terminal, else a plain line every 10 % (for logs)."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import MofNCompleteColumn, Progress

        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(),
                      console=Console(stderr=True)) as bar:
            task = bar.add_task("embedding", total=total)
            yield lambda n: bar.advance(task, n)
        return
    done, step = [0], max(1, total // 10)

    def advance(n: int) -> None:
        before, done[0] = done[0], done[0] + n
        if done[0] // step > before // step or done[0] == total:
            print(f"embedded {done[0]}/{total} images", file=sys.stderr, flush=True)

    yield advance


@torch.inference_mode()
def embed_files(encoder: Encoder, files: list[Path], preprocess: dict, batch_size: int = 64,
                workers: int = 2, device: str = "cpu", patches: bool = False) -> Embeddings:
    """Embeds ``files`` in batches; ``preprocess`` holds ``input_size``, ``crop_pct``, ``interpolation``."""
    chans = preprocess["input_size"][0]
    if chans not in MODES:
        raise UserError(f"cannot feed images to a model with in_chans={chans}; accepted: 1, 3")
    transform = eval_transform(preprocess["input_size"], preprocess["crop_pct"], preprocess["interpolation"])
    loader = DataLoader(ImageFiles(files, transform, MODES[chans]), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate, pin_memory=device == "cuda")
    encoder = encoder.to(device).eval()
    rows, cls, tokens, skipped = [], [], [], []
    with _progress(len(files)) as advance:
        for batch in loader:
            skipped += [(files[i], why) for i, why in batch["bad"]]
            if batch["image"] is not None:
                feats = encoder.features(batch["image"].to(device, non_blocking=True), with_attn=False)
                cls.append(feats.cls.float().cpu())
                if patches:
                    tokens.append(feats.patches.float().cpu())
                rows += batch["index"]
            advance(len(batch["index"]) + len(batch["bad"]))
    if not rows:
        raise UserError(f"none of the {len(files)} images could be decoded; first: "
                        f"{skipped[0][0]} ({skipped[0][1]})")
    return Embeddings([files[i] for i in rows], torch.cat(cls).numpy(),
                      torch.cat(tokens).numpy() if patches else None, skipped)


def _write_parquet(path: Path, files: list[Path], cls: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = cls.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(cls.reshape(-1)))
    pq.write_table(pa.table({"path": [str(f) for f in files], "embedding": column}), path)


def write_embeddings(result: Embeddings, out: str | Path) -> list[Path]:
    """Writes ``result`` as the module docstring says; returns the files written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out]
    if out.suffix.lower() == ".npy":
        np.save(out, result.cls)
        written.append(out.with_suffix(".files.txt"))
        written[-1].write_text("".join(f"{f}\n" for f in result.files))
    else:
        _write_parquet(out, result.files, result.cls)
    if result.patches is not None:
        written.append(out.with_suffix(".patches.npy"))
        np.save(written[-1], result.patches)
    written.append(out.with_suffix(".skipped.txt"))
    written[-1].write_text("".join(f"{f}\t{why}\n" for f, why in result.skipped))
    return written


def embed(model: str | Path, images: str | Path, out: str | Path, batch_size: int = 64,
          workers: int = 2, device: str = "cpu", patches: bool = False, trust: bool = False,
          allow_unfinished: bool = False) -> Embeddings:
    """Embeds every image under ``images`` with ``model`` and writes the result to ``out``.

    ``trust``: allow a checkpoint that needs full unpickling (it may run code when loaded).
    ``allow_unfinished``: embed with a checkpoint of a run that did not finish.

    Raises:
        UserError: bad output suffix, option or device, missing model or folder, no decodable image.
    """
    from distortkd.export import load_encoder

    if Path(out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"output {str(out)!r} must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if batch_size < 1 or workers < 0:
        raise UserError(f"batch size {batch_size} / workers {workers}; accepted: >= 1 / >= 0")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available; accepted here: cpu")
    if Path(out).is_dir():
        raise UserError(f"output {str(out)!r} is a folder; accepted: a file path ending in "
                        f"{' or '.join(OUTPUT_SUFFIXES)}")
    rundir.check_writable(Path(out).parent, "output folder", "a writable folder")  # before any image is embedded, not after
    files = list_images(images)
    encoder, preprocess = load_encoder(model, trust, allow_unfinished)
    if patches and not encoder.is_vit:
        raise UserError(f"--patches needs a ViT; {type(encoder.backbone).__name__} has no patch tokens")
    result = embed_files(encoder, files, preprocess, batch_size, workers, device, patches)
    write_embeddings(result, out)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distortkd-embed", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="exported folder (config.json), .ckpt file or run folder")
    p.add_argument("images", help="folder of images, searched recursively")
    p.add_argument("out", help="output .npy ([N, D] + .files.txt) or .parquet (path, embedding)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--patches", action="store_true", help="also save patch tokens [N, P, D] as .patches.npy")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that needs full unpickling (it can run code: trusted files only)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="use a checkpoint of a run that did not finish (metrics.json status not ok)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distortkd-embed``; returns the exit status (2 for a user error)."""
    opts = _parser().parse_args(argv)
    try:
        result = embed(opts.model, opts.images, opts.out, opts.batch_size, opts.workers,
                       opts.device, opts.patches, opts.trust_checkpoint, opts.allow_unfinished)
    except UserError as err:
        print(f"distortkd-embed: error: {err}", file=sys.stderr)
        return 2
    for path, why in result.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if result.skipped:
        print(f"skipped {len(result.skipped)} undecodable image(s); listed in "
              f"{Path(opts.out).with_suffix('.skipped.txt')}", file=sys.stderr)
    print(f"wrote {opts.out}: {result.cls.shape[0]} embeddings of dimension {result.cls.shape[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
