"""One LightningDataModule over Hugging Face ``datasets``, configured per dataset by a spec: a
``DATASETS`` entry, or for the user's own data (``data=folder``, ``data=hub``) one read from the
data itself (``owndata.own_spec``).

Batches are clean: ``{"image": [B, C, S, S] float32 in [0, 1], "label": [B] int64 (-1: unlabelled
own data), "index": [B] int64}``, ``index`` being the sample's row in its underlying split
(stable across runs: it seeds per-sample eval distortions, applied later on the device; this
module knows nothing of them).

Subsets never renumber ``index`` and compose in this order: ``train_subset`` (a row range of train)
→ CAMELYON17's OOD filter → ``val_fraction`` (val carved from train) → ``label_fraction`` (train only) → ``limit_train`` / ``limit_eval`` (the
first K rows of a seeded shuffle; eval limits use seed 0 so every run sees the same eval images).

Three ways to hold a split: lazily (``HFImages``, PIL decode and transforms in the workers), in
memory (``TensorImages``: small same-size datasets, batched transforms in the workers) or, with
``cache="uint8"``, as uint8 canvases decoded once to disk (``cache.CanvasImages``): the loaders
then carry uint8 ``[B, C, S', S']`` and ``on_after_batch_transfer`` crops them on the device into
the batches above. Loops that iterate a loader outside Lightning's hooks (evaluation, k-NN
banks, attention figures) read it through ``device_batches``, which converts the same way: outside
this module every batch is ``[0, 1]`` images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from distortkd import cache as canvases
from distortkd import owndata, sources
from distortkd.errors import UserError, unknown
from distortkd.imagesets import HFImages, TensorImages, collate
from distortkd.sources import DATASETS, OWN, DatasetSpec, load_hub_split, open_local
from distortkd.splits import carve_val, first_k, stratified_subset
from distortkd.transforms import BatchTransform, canvas_transform, pil_transform

log = logging.getLogger(__name__)


def _check_options(h, rrc_scale: tuple, subset: tuple | None, spec: DatasetSpec | None) -> None:
    for ok, bad in [
        (h.in_chans in (1, 3), f"in_chans {h.in_chans}; accepted: 1, 3"),
        (0 < h.label_fraction <= 1, f"label_fraction {h.label_fraction}; accepted: 0 < f <= 1"),
        (h.val_fraction is None or 0 < h.val_fraction < 1,
         f"val_fraction {h.val_fraction}; accepted: 0 < f < 1, or null"),
        (0 < h.crop_pct <= 1, f"crop_pct {h.crop_pct}; accepted: 0 < crop_pct <= 1"),
        (len(rrc_scale) == 2 and 0 < rrc_scale[0] <= rrc_scale[1] <= 1,
         f"rrc_scale {list(rrc_scale)}; accepted: [low, high], 0 < low <= high <= 1"),
        (subset is None or (len(subset) == 2 and 0 <= subset[0] < subset[1]),
         f"train_subset {subset}; accepted: [start, stop] with 0 <= start < stop, or null"),
        (0 <= h.max_bad_fraction < 1, f"max_bad_fraction {h.max_bad_fraction}; accepted: [0, 1)"),
        (all(k is None or k >= 1 for k in (h.limit_train, h.limit_eval)),
         f"limit_train {h.limit_train} / limit_eval {h.limit_eval}; accepted: >= 1, or null"),
        (not h.val_ood or (spec and spec.ood), f"val_ood for {h.name}; accepted for: "
         + ", ".join(k for k, s in DATASETS.items() if s.ood)),
        (h.cache in canvases.KINDS, f"cache {h.cache!r}; accepted: null, uint8"),
        (h.cache_size is None or h.cache_size >= 1, f"cache_size {h.cache_size}; accepted: >= 1"),
        (not (h.cache and h.in_memory), "cache=uint8 with in_memory=true; accepted: one of them"),
    ]:
        if not ok:
            raise UserError(f"invalid data option {bad}")


_STAGE_ROLES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                "predict": ("test",)}


class ImageDataModule(L.LightningDataModule):
    """Clean batches from one ``DATASETS`` entry, or the user's own data (``folder``, ``hub``)
    (batch format and subset order: module docstring).

    Args:
        name: a key of ``DATASETS``; or ``folder`` (an image folder at ``path``, see
            ``owndata.folder_layout``) or ``hub`` (any hub image-classification dataset,
            ``hub_id``, or its local copy at ``path``), whose spec is read from the data itself.
        path: local copy (``save_to_disk`` folder, hub-layout parquet, image folder; an IDX folder
            for Fashion-MNIST); None: the hub (Fashion-MNIST: Debian's IDX files when installed).
        hub_id, image_column, label_column, splits: own data only: the hub dataset; the image and
            label columns and the split of each role (``{"train": ..., "val": ..., "test": ...}``),
            None for what ``owndata.own_spec`` reads from the features. Without a val split, val is
            carved by ``val_fraction``; without a test split, the test role is the val split.
        image_size: output side S in pixels. crop_pct: eval center crop of the resized short side.
        in_chans: 3 (RGB) or 1 (grayscale).
        label_fraction: stratified fraction of train labels kept, in (0, 1].
        val_fraction: a seeded, stratified fraction in (0, 1) of the train rows (after
            ``train_subset``, before ``label_fraction``) that becomes the ``val`` role instead of
            the spec's val split, so model selection never sees the test split; None: the spec's.
        train_subset: ``[start, stop)`` rows of the train split. limit_train, limit_eval: at most
            this many images per split (smoke runs).
        augment: RandomResizedCrop(``rrc_scale``) + flip for train; False: the eval transform.
        max_bad_fraction: undecodable images tolerated per split before a ``UserError``.
        in_memory: hold splits as one uint8 tensor (same-size images); None: the spec's default.
        val_ood: ``val_dataloader`` returns ``[val, ood]`` (CAMELYON17).
        cache_dir: ``datasets``' cache, and the root of the uint8 cache; None: HF_DATASETS_CACHE.
        cache: ``"uint8"``: decode each split once into uint8 canvases on disk (``distortkd.cache``)
            and crop batches on the device in ``on_after_batch_transfer``; None: decode per epoch.
        cache_size: canvas side S' (shorter side resized to S', centre S' x S' kept); None:
            ``floor(image_size / crop_pct)`` (``image_size`` for small datasets).
    """

    def __init__(self, name: str, path: str | None = None, image_size: int = 224,
                 crop_pct: float = 0.875, in_chans: int = 3, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 4, pin_memory: bool = True,
                 drop_last: bool = False, label_fraction: float = 1.0, seed: int = 0,
                 train_subset: Sequence[int] | None = None, limit_train: int | None = None,
                 limit_eval: int | None = None, augment: bool = True,
                 rrc_scale: Sequence[float] = (0.08, 1.0), max_bad_fraction: float = 0.001,
                 in_memory: bool | None = None, val_ood: bool = False,
                 cache_dir: str | None = None, cache: str | None = None,
                 cache_size: int | None = None, val_fraction: float | None = None,
                 hub_id: str | None = None, image_column: str | None = None,
                 label_column: str | None = None, splits: dict | None = None):
        super().__init__()
        if name not in DATASETS and name not in OWN:
            raise unknown("dataset", name, [*DATASETS, *OWN])
        self.save_hyperparameters(logger=False)
        self.name, self.path, self.in_chans = name, path, int(in_chans)
        self._spec = DATASETS.get(name)  # own data: read from the data on first use (spec)
        self.rrc_scale = tuple(float(s) for s in rrc_scale)
        self.train_subset = None if train_subset is None else tuple(int(i) for i in train_subset)
        _check_options(self.hparams, self.rrc_scale, self.train_subset, self._spec)
        owndata.check_options(self.hparams)
        default_in_memory = self._spec.in_memory if self._spec else False
        self.in_memory = default_in_memory if in_memory is None and not cache else bool(in_memory)
        self.class_names: list[str] | None = (list(self._spec.names or []) or None
                                              if self._spec else None)
        self.idx_dir = sources.idx_folder(path, self._spec) if self._spec else None  # IDX files
        self._raw: dict[str, dict] = {}
        self._sets: dict[str, Dataset] = {}
        self._local: datasets.DatasetDict | None = None

    @property
    def spec(self) -> DatasetSpec:
        """The ``DATASETS`` entry, or the own data's spec read from its splits and features."""
        if self._spec is None:
            h = self.hparams
            self._spec = owndata.own_spec(self._open(), self._where, h.image_column,
                                          h.label_column, h.splits)
            self.class_names = list(self._spec.names or []) or None
        return self._spec

    @property
    def num_classes(self) -> int:
        """The class count; for own data without labels or with one class, a ``UserError`` (only
        a fine-tune or an evaluation asks: distillation reads no labels)."""
        spec = self.spec
        names = self.class_names or [str(c) for c in range(spec.num_classes)]
        err = owndata.unlabelled_error(self._where, self.name, names,
                                       spec.label_key is not None) if self.name in OWN else None
        if err is not None:
            raise err
        return spec.num_classes

    @property
    def _where(self) -> str:
        """Own data in messages: its hub id or path."""
        return str(self.hparams.hub_id or self.path)

    @property
    def cache_size(self) -> int:
        h = self.hparams
        return h.cache_size or canvases.default_side(h.image_size, h.crop_pct, self.spec.small)

    def _open(self) -> datasets.DatasetDict:
        """The local copy at ``path`` (own data: also an image folder, or every hub split)."""
        if self._local is None:
            h = self.hparams
            if self.name == "folder":
                self._local = owndata.open_folder(self.path, h.cache_dir)
            elif self.name == "hub" and self.path is None:
                self._local = owndata.open_hub(h.hub_id, h.cache_dir)
            else:
                self._local = open_local(self.path, h.cache_dir)
        return self._local

    def prepare_data(self) -> None:
        """Downloads (hub) or indexes (local parquet/image folder) once per node; with ``cache``,
        also decodes every split into its canvas file (once: later runs find it)."""
        if self.idx_dir is None and (self.path is not None or self.name in OWN):
            self._open()
        elif self.idx_dir is None:
            for split in sorted(set(self.spec.splits.values())):
                load_hub_split(self.name, split, self.hparams.cache_dir)
        for split in sorted(set(self.spec.splits.values())) if self.hparams.cache else ():
            self._load(split)

    def setup(self, stage: str | None = None) -> None:
        """Loads the splits ``stage`` needs (train, val and test for None), on every process."""
        roles = _STAGE_ROLES.get(stage, ("train", "val", "test"))
        for role in roles + (("ood",) if self.hparams.val_ood and "val" in roles else ()):
            self.dataset(role)

    def _table(self, split: str) -> datasets.Dataset:
        if self.path is not None or self.name in OWN:
            self._open()
        path = self.hparams.hub_id or self.path
        return sources.split_table(self.name, split, path, self._local, self.hparams.cache_dir,
                                   spec=self.spec)

    def _labels(self, table: datasets.Dataset, split: str) -> np.ndarray:
        """Labels ``[N]`` in the spec's class order (class folders mapped by ``class_list``)."""
        labels, names = sources.split_labels(self.name, table, split, spec=self.spec)
        self.class_names = names or self.class_names
        return labels

    def _load(self, split: str) -> dict:
        """A split's ``labels [N]`` and ``table`` (lazy) or ``images [N, C, h, w]`` uint8."""
        if split in self._raw:
            return self._raw[split]
        raw = {"table": None, "images": None, "ood": None, "bad": None, "canvas": None}
        if self.idx_dir is not None and self.hparams.cache:
            raise UserError(f"cache=uint8 for {self.name} from IDX files ({self.idx_dir}): "
                            "they are held in memory already; accepted: cache=null")
        if self.idx_dir is not None:
            images, raw["labels"] = sources.read_idx_split(self.idx_dir, split)
            raw["images"] = torch.from_numpy(images.copy())[:, None]
        else:
            raw["table"] = table = self._table(split)
            raw["labels"] = self._labels(table, split)
            if self.spec.ood and split == self.spec.splits["ood"]:
                raw["ood"] = sources.column_values(table, self.spec.ood[0]) == self.spec.ood[1]
            if self.in_memory:
                where = f"{self.name} {split}"
                rows = HFImages(table, self.spec.image_key, raw["labels"], np.arange(len(table)),
                                None, self._mode, self.hparams.max_bad_fraction, where)
                raw["images"], raw["bad"] = rows.decode_all(), rows.bad.numpy()
            elif self.hparams.cache:
                raw.update(self._cached(split, table, raw["labels"]))
        self._raw[split] = raw
        return raw

    def _cached(self, split: str, table: datasets.Dataset, labels: np.ndarray) -> dict:
        """The split's uint8 canvas file (decoded into it first, unless cached): ``canvas``
        (path), ``shape`` ``[N, C, S', S']`` and ``bad [N]``."""
        h, side = self.hparams, self.cache_size
        source = str(Path(self.path).expanduser().resolve()) if self.path else self.spec.hub_id
        where = canvases.folder(h.cache_dir, self.name, source, split, side, self.in_chans)
        meta = canvases.sidecar(self.name, source, split, labels, side, self.in_chans)
        rows = HFImages(table, self.spec.image_key, labels, np.arange(len(table)),
                        canvas_transform(side), self._mode, h.max_bad_fraction,
                        f"{self.name} {split}")
        valid = canvases.load_or_build(where, meta, rows, h.num_workers)
        return {"canvas": where / canvases.IMAGES, "shape": meta["shape"], "bad": ~valid}

    @property
    def _mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"

    def _split(self, role: str) -> str:
        """The split ``role`` reads: with ``val_fraction``, val is carved from train."""
        if self._carved(role):
            return self.spec.splits["train"]
        if role == "val" and self.name in OWN and "val" not in self.spec.splits:
            raise UserError(f"{self._where} has no val split and "
                            "data.val_fraction is null; accepted: data.val_fraction in (0, 1), "
                            "a val/ folder or data.splits.val")  # never the test split
        if role not in self.spec.splits:
            raise unknown(f"split of {self.name}", role, self.spec.splits)
        return self.spec.splits[role]

    def _carved(self, role: str) -> bool:
        """Val carved from train: ``val_fraction`` set (own data: only when it has no val split)."""
        own_val = self.name in OWN and "val" in self.spec.splits
        return role in ("train", "val") and self.hparams.val_fraction is not None and not own_val

    def _index(self, role: str, raw: dict) -> np.ndarray:
        """Rows of the split that ``role`` uses, in the order of the module docstring."""
        h, index = self.hparams, np.arange(len(raw["labels"]))
        if self._carved(role) or (role == "train" and self.train_subset is not None):
            index = self._train_rows(index)
        if raw["ood"] is not None and role in ("val", "ood"):
            index = index[raw["ood"][index] == (role == "ood")]
        if raw["bad"] is not None:
            index = index[~raw["bad"][index]]
        if self._carved(role):
            train, val = carve_val(raw["labels"][index], h.val_fraction, h.seed)
            index = index[train if role == "train" else val]
        if role != "train":
            return first_k(index, h.limit_eval, 0)
        if h.label_fraction < 1:
            index = index[stratified_subset(raw["labels"][index], h.label_fraction, h.seed)]
        return first_k(index, h.limit_train, h.seed)

    def _train_rows(self, index: np.ndarray) -> np.ndarray:
        """``index`` cut to ``train_subset``, if any."""
        if self.train_subset is not None:
            if self.train_subset[1] > len(index):
                raise UserError(f"train_subset {list(self.train_subset)} is out of range; the "
                                f"{self.name} train split has {len(index)} rows")
            index = index[slice(*self.train_subset)]
        return index

    def dataset(self, role: str) -> Dataset:
        """The dataset of ``role`` (``train``, ``val``, ``test`` or ``ood``), built once."""
        if role == "test" and self.name in OWN and "test" not in self.spec.splits:
            if role not in self._sets:  # documented in conf/data/folder.yaml and hub.yaml
                log.warning("%s has no test split: the test role is the val split", self._where)
                self._sets[role] = self.dataset("val")
        if role not in self._sets:
            self._sets[role] = self._build(role, role == "train" and self.hparams.augment)
        return self._sets[role]

    def _build(self, role: str, train: bool) -> Dataset:
        """``role``'s rows with the training transform (``train``) or the eval one."""
        raw, h = self._load(self._split(role)), self.hparams
        index = self._index(role, raw)
        args = (h.image_size, h.crop_pct, self.spec.small, train, self.rrc_scale)
        if raw["images"] is not None:
            transform = BatchTransform(*args, self.in_chans)
            return TensorImages(raw["images"], raw["labels"], index, transform)
        if raw["canvas"] is not None:  # crops happen on the device (to_images)
            return canvases.CanvasImages(raw["canvas"], raw["shape"], raw["labels"], index)
        return HFImages(raw["table"], self.spec.image_key, raw["labels"], index,
                        pil_transform(*args), self._mode, h.max_bad_fraction, f"{self.name} {role}")

    def bank_dataloader(self, world_size: int = 1, rank: int = 0) -> DataLoader:
        """The train rows in a fixed order with the eval transform (no crop, no flip), whatever
        ``augment``: a k-NN feature bank that does not depend on training-time augmentation, as
        DINO's ``eval_knn.py`` builds it. Canvas batches still need ``to_images(train=False)``.
        With ``world_size`` > 1, rank ``rank``'s shard: rows ``rank, rank + world_size, ...``, the
        last shard padded from the first rows (``DistributedSampler``, unshuffled)."""
        h = self.hparams
        rows = self._build("train", train=False)
        sampler = (DistributedSampler(rows, num_replicas=world_size, rank=rank, shuffle=False)
                   if world_size > 1 else None)
        return DataLoader(rows, h.eval_batch_size or h.batch_size, sampler=sampler,
                          num_workers=h.num_workers, pin_memory=h.pin_memory, collate_fn=collate)

    @property
    def skipped(self) -> dict[str, int]:
        """Undecodable images skipped so far per role (lazy splits count them as they meet them)."""
        out = {}
        for role, ds in self._sets.items():
            bad = ds.bad if isinstance(ds, HFImages) else self._raw[self._split(role)]["bad"]
            out[role] = 0 if bad is None else int(bad.sum())
        return out

    def _loader(self, role: str) -> DataLoader:
        h, train = self.hparams, role == "train"
        size = h.batch_size if train else h.eval_batch_size or h.batch_size
        return DataLoader(self.dataset(role), size, shuffle=train, drop_last=train and h.drop_last,
                          num_workers=h.num_workers, pin_memory=h.pin_memory,
                          persistent_workers=h.num_workers > 0, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The val loader, or ``[val, ood]`` with ``val_ood`` (CAMELYON17)."""
        val = self._loader("val")
        return [val, self._loader("ood")] if self.hparams.val_ood else val

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def ood_dataloader(self) -> DataLoader:
        """CAMELYON17's OOD validation split (hospital 1)."""
        return self._loader("ood")

    def to_images(self, batch: dict, train: bool = False) -> dict:
        """A batch of uint8 canvases (``cache="uint8"``) → the batch of the module docstring, on
        the canvases' device: RandomResizedCrop + flip when ``train`` (and ``augment``), else the
        eval center crop (``crop_pct`` as ``pil_transform``: ``image_size / floor(image_size /
        crop_pct)`` of the short side). Float batches (the other paths) pass through unchanged."""
        if not isinstance(batch, dict) or getattr(batch.get("image"), "dtype", None) != torch.uint8:
            return batch
        h = self.hparams
        pct = h.image_size / canvases.default_side(h.image_size, h.crop_pct, small=False)
        transform = BatchTransform(h.image_size, pct, self.spec.small, train and h.augment,
                                   self.rrc_scale, self.in_chans)
        # Convex weights, but float sums can overshoot 1 by an ulp: clamp to keep the contract.
        return {**batch, "image": transform(batch["image"]).clamp_(0, 1)}

    def device_batches(self, loader: DataLoader, device: torch.device | str) -> Iterator[dict]:
        """``loader``'s batches on ``device`` as clean ``[0, 1]`` batches (module docstring):
        uint8 canvases get the eval crop there, as Lightning's hook would give them outside
        training. For loops that iterate a loader themselves, so none converts by hand."""
        for batch in loader:
            yield self.to_images(move_data_to_device(batch, device))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning's hook after each batch reaches the device: ``to_images``, training crops while
        the trainer trains (each batch's boxes and flips drawn from the device's global RNG).

        Lightning runs only this hook when the LightningModule overrides it too, so the module's
        own hook runs here, after, on the float images."""
        trainer = self.trainer
        batch = self.to_images(batch, train=trainer is not None and trainer.training)
        module = trainer.lightning_module if trainer is not None else None
        if module is not None and is_overridden("on_after_batch_transfer", module):
            batch = module.on_after_batch_transfer(batch, dataloader_idx)
        return batch
