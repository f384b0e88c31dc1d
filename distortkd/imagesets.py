"""The torch ``Dataset``s of a split: ``TensorImages`` (held in memory, batched transforms) and
``HFImages`` (a ``datasets`` table decoded lazily with PIL in the workers, undecodable images
skipped and counted). Both return whole batches ``{"image", "label", "index"}`` from
``__getitems__``; ``collate`` passes them through. The uint8 canvases of ``data.cache=uint8`` are
``cache.CanvasImages``.
"""

from __future__ import annotations

import io
import logging

import datasets
import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2

from distortkd.errors import UserError
from distortkd.images import BadImage, open_image
from distortkd.transforms import BatchTransform

log = logging.getLogger(__name__)


def collate(batch):
    """Batches come whole from ``__getitems__``; per-sample lists drop undecodable (None) ones."""
    return batch if isinstance(batch, dict) else default_collate([s for s in batch if s])


class TensorImages(Dataset):
    """A split held in memory as ``images [N, C, h, w]`` uint8 and ``labels [N]``; ``index`` picks
    rows. ``__getitems__`` gathers and transforms a whole batch: no PIL, no per-sample Python."""

    def __init__(self, images: Tensor, labels, index, transform: BatchTransform):
        self.images, self.labels, self.transform = images, torch.as_tensor(labels), transform
        self.index = torch.as_tensor(index, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, positions: list[int]) -> dict[str, Tensor]:
        # Too little work per op to share out: on a busy 2-core machine OpenMP's hand-offs cost
        # 10-50x the work itself. Workers run one thread already; in the main process, so does this.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            idx = self.index[torch.as_tensor(positions, dtype=torch.int64)]
            image = self.transform(self.images[idx])
            return {"image": image, "label": self.labels[idx], "index": idx}
        finally:
            torch.set_num_threads(threads)

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}


class HFImages(Dataset):
    """A split read lazily from a ``datasets`` table with an undecoded image column (``labels [N]``
    covers the split, ``index`` picks rows), decoded with PIL in the DataLoader workers.

    An undecodable file is logged, flagged in ``bad`` (shared memory: the main process sees what
    the workers met) and left out of its batch; more than ``max_bad_fraction`` of the split bad
    raises ``UserError``. ``transform=None``: ``decode_all`` holds the split in memory instead.
    """

    def __init__(self, table: datasets.Dataset, key: str, labels, index, transform, mode: str,
                 max_bad_fraction: float, where: str):
        self.table, self.key, self.mode = table, key, mode
        self.transform = transform or v2.PILToTensor()
        self.labels, self.index = np.asarray(labels, np.int64), np.asarray(index, np.int64)
        self.max_bad, self.where = max_bad_fraction, where
        self.bad = torch.zeros(len(self.index), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.index)

    def _decode(self, value: dict, position: int) -> PIL.Image.Image | None:
        value = value or {}  # a null cell
        try:
            source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
            if source is None:
                raise BadImage("the row holds no image (neither bytes nor path)")
            return open_image(source, self.mode)
        except BadImage as err:
            self.bad[position] = True
            n_bad, path = int(self.bad.sum()), value.get("path")
            log.warning("skipping undecodable image %s (row %d of %s): %s",
                        path, self.index[position], self.where, err)
            if n_bad > self.max_bad * len(self):
                raise UserError(
                    f"{n_bad} of {len(self)} images of {self.where} are undecodable, more than "
                    f"max_bad_fraction {self.max_bad}; last: {path}") from None
            return None

    def __getitems__(self, positions: list[int]) -> dict[str, Tensor]:
        values = self.table[self.index[positions].tolist()][self.key]
        decoded = [(p, self._decode(v, p)) for p, v in zip(positions, values, strict=True)]
        kept = [(p, self.transform(im)) for p, im in decoded if im is not None]
        idx = self.index[[p for p, _ in kept]]
        image = torch.stack([t for _, t in kept]) if kept else torch.empty(0)
        return {"image": image, "label": torch.from_numpy(self.labels[idx]),
                "index": torch.from_numpy(idx)}

    def __getitem__(self, position: int) -> dict[str, Tensor] | None:
        batch = self.__getitems__([position])
        return {k: v[0] for k, v in batch.items()} if len(batch["index"]) else None

    def decode_all(self) -> Tensor:
        """All rows of ``index`` decoded once (``transform=None``): uint8 ``[len, C, h, w]``,
        zeros where ``bad``."""
        try:
            chunks = [self.__getitems__(list(range(i, min(i + 1024, len(self)))))["image"]
                      for i in range(0, len(self), 1024)]
            images = torch.cat([c for c in chunks if len(c)])
        except RuntimeError:
            raise UserError(f"{self.where}: in_memory needs images of one size; set "
                            "data.in_memory=false") from None
        full = torch.zeros(len(self), *images.shape[1:], dtype=torch.uint8)
        full[~self.bad] = images
        return full
