"""Where the data comes from: one spec per dataset (``DATASETS``), the Hugging Face Hub (offline
detected at once), local copies (``data.path``) and Fashion-MNIST's IDX files (Debian's ``.gz``).

Everything here returns tables, labels and uint8 arrays; ``distortkd.data`` turns them into
torch Datasets and loaders. A user's own data (``data=folder``, ``data=hub``) is ``owndata``.
"""

from __future__ import annotations

import gzip
import math
import os
import socket
import urllib.parse
import urllib.request
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np

from distortkd.errors import UserError, unknown


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: hub id, class count, role (``train``/``val``/``test``/``ood``) → split name.

    ``small``: tight low-resolution images (≤ 96 px), resized whole to the model size for eval (no
    ``crop_pct`` border). ``sizes``: rows of the full hub copy, checked on hub loads. ``ood``:
    (column, value) marking the OOD rows of ``splits["ood"]``, which ``val`` then leaves out.
    ``class_list``: file of class-folder names in label order. ``idx_dir``: default IDX folder.
    ``names``: class names when the source has no ``ClassLabel``.
    """

    hub_id: str
    num_classes: int
    splits: dict
    image_key: str = "image"
    label_key: str | None = "label"  # None: unlabelled (own data; distillation only)
    small: bool = False
    in_memory: bool = False
    sizes: dict | None = None
    ood: tuple | None = None
    class_list: str | None = None
    idx_dir: str | None = None
    names: tuple | None = None


NO_VAL = {"train": "train", "val": "test", "test": "test"}  # no validation split: val = test
DATASETS: dict[str, DatasetSpec] = {
    # CMC's 100 classes (Tian et al. 2019); the one 5k validation split serves as val and test.
    "imagenet100": DatasetSpec(
        "clane9/imagenet-100", 100, {"train": "train", "val": "validation", "test": "validation"},
        sizes={"validation": 5000}, class_list="imagenet100_classes.txt"),
    "cifar10": DatasetSpec("uoft-cs/cifar10", 10, NO_VAL, image_key="img", small=True,
                           sizes={"train": 50000, "test": 10000}),
    "cifar100": DatasetSpec("uoft-cs/cifar100", 100, NO_VAL, image_key="img", small=True,
                            label_key="fine_label", sizes={"train": 50000, "test": 10000}),
    "stl10": DatasetSpec("tanganke/stl10", 10, NO_VAL, small=True,
                         sizes={"train": 5000, "test": 8000}),
    "resisc45": DatasetSpec("timm/resisc45", 45,
                            {"train": "train", "val": "validation", "test": "test"}),
    # WILDS: train = hospitals 0, 3, 4; validation = ID val (0, 3, 4) + OOD val (hospital 1);
    # test = hospital 2. Here val is the ID part and ood the hospital-1 part.
    "camelyon17": DatasetSpec(
        "wltjr1007/Camelyon17-WILDS", 2,
        {"train": "train", "val": "validation", "test": "test", "ood": "validation"},
        ood=("center", 1), sizes={"train": 302436, "validation": 68464, "test": 85054},
        names=("normal", "tumor")),
    "fashion_mnist": DatasetSpec(
        "zalando-datasets/fashion_mnist", 10, NO_VAL, small=True, in_memory=True,
        sizes={"train": 60000, "test": 10000}, idx_dir="/usr/share/datasets/fashion-mnist",
        names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")),
}
LOAD_ERRORS = (OSError, ValueError, datasets.exceptions.DatasetsError)  # what loading raises
OWN = ("folder", "hub")  # a user's own data: no entry in DATASETS, its spec is read from the data


@lru_cache(maxsize=1)
def _hub_unreachable(timeout: float = 3.0) -> bool:
    """One TCP connect: without it an offline ``load_dataset`` retries for ~25 s before failing."""
    if urllib.request.getproxies().get("https"):
        return False  # behind a proxy, let the proxy decide
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return False
    except OSError:
        return True


@contextmanager
def _offline_mode():
    """Offline mode for one call: both libraries read their env vars at import, so set the flags."""
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def hub_load(what: str, hub_id: str, split: str | None, cache_dir: str | None):
    """``load_dataset(hub_id, split=split)``; offline and uncached, a one-line ``UserError``."""
    flags = [os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    offline = bool({"1", "ON", "YES", "TRUE"} & set(flags)) or datasets.config.HF_HUB_OFFLINE
    offline = offline or _hub_unreachable()
    try:
        with _offline_mode() if offline else nullcontext():
            return datasets.load_dataset(hub_id, split=split, cache_dir=cache_dir)
    except LOAD_ERRORS as err:
        why = "offline and not in the cache" if offline else str(err).strip().split("\n")[0][:160]
        raise UserError(f"cannot load dataset {what!r} from the Hugging Face Hub ({hub_id}, "
                        f"split {split or 'all'!r}): {why}; set data.path=<local copy> (save_to_disk "
                        "folder, parquet files or image folder)") from None


def load_hub_split(name: str, split: str, cache_dir: str | None = None) -> datasets.Dataset:
    """One split from the hub or its local cache; offline and uncached, a one-line ``UserError``."""
    spec = DATASETS[name]
    ds = hub_load(name, spec.hub_id, split, cache_dir)
    expected = (spec.sizes or {}).get(split)
    if expected is not None and len(ds) != expected:
        raise UserError(f"{spec.hub_id} split {split!r} has {len(ds):,} rows; the full hub copy "
                        f"has {expected:,} (use data.path for a partial local copy)")
    return ds


def open_local(path: str | Path, cache_dir: str | None = None) -> datasets.DatasetDict:
    """A local copy: ``save_to_disk`` folder, parquet shards in the hub layout, or image folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data.path {str(path)!r} does not exist")
    if (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    try:  # load_dataset picks the parquet or the imagefolder builder from the files it finds
        return datasets.load_dataset(str(path), cache_dir=cache_dir)
    except LOAD_ERRORS as err:
        raise UserError(f"data.path {str(path)!r} holds no dataset that `datasets` reads: "
                        f"{str(err).strip().split(chr(10))[0][:160]}") from None


_IDX_HINT = "re-install dataset-fashion-mnist or point data.path elsewhere"


def _idx_error(path: Path, what: str) -> UserError:
    return UserError(f"{path} {what}; {_IDX_HINT}")


def _idx_bytes(path: Path) -> bytes:
    """The file's IDX bytes, gunzipped when ``.gz``; of a cut-off stream, what it holds."""
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:  # cut off: the bytes so far, so that the size check can say how short
        return zlib.decompressobj(wbits=31).decompress(raw)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (``.gz`` or raw) as uint8: images ``[N, 28, 28]`` or labels ``[N]``.

    By hand: torchvision's IDX reader takes uncompressed files only, and Debian ships ``.gz``.
    Every way a file can be short, cut, empty or not IDX is a one-line ``UserError`` naming it.
    """
    if not path.exists() and not path.with_suffix("").exists():
        raise _idx_error(path, f"is missing, and so is {path.with_suffix('').name}")
    path = path if path.exists() else path.with_suffix("")
    try:
        data = _idx_bytes(path)
    except (OSError, zlib.error) as err:  # not gzip, corrupt deflate data, bad CRC, unreadable
        raise _idx_error(path, f"cannot be read ({type(err).__name__}: {err})") from None
    if not data:
        raise _idx_error(path, "is empty")
    if data[:3] != b"\0\0\x08" or len(data) < 4:  # two zero bytes, then type code 8 = uint8
        raise _idx_error(path, f"is not a uint8 IDX file (magic {data[:4].hex()}, "
                         "expected 000008xx)")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise _idx_error(path, f"is truncated: {len(data)} bytes, within its {header}-byte header")
    dims = np.frombuffer(data, ">u4", count=data[3], offset=4).astype(int)
    need, have = math.prod(dims), len(data) - header
    if have != need:
        shape = "x".join(str(d) for d in dims)
        what = "is truncated" if have < need else "has trailing bytes"
        raise _idx_error(path, f"{what}: header says {shape} ({need:,} bytes of data), file holds "
                         f"{have:,}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def idx_folder(path: str | None, spec: DatasetSpec) -> Path | None:
    """The folder of ``spec``'s IDX files (``path``, else ``spec.idx_dir``); None if none there."""
    idx = Path(path or spec.idx_dir) if spec.idx_dir else None  # IDX files, if any
    has_idx = idx and any((idx / f"train-images-idx3-ubyte{s}").exists() for s in (".gz", ""))
    return idx if has_idx else None


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A Fashion-MNIST split from its IDX files: images ``[N, 28, 28]`` uint8, labels ``[N]``."""
    prefix = folder / {"train": "train", "test": "t10k"}[split]
    image_file = Path(f"{prefix}-images-idx3-ubyte.gz")
    label_file = Path(f"{prefix}-labels-idx1-ubyte.gz")
    images, labels = read_idx(image_file), read_idx(label_file)
    classes = DATASETS["fashion_mnist"].num_classes
    for file, array, ndim in ((image_file, images, 3), (label_file, labels, 1)):
        if array.ndim != ndim:
            raise _idx_error(file, f"holds a {array.ndim}-d array; expected {ndim}-d")
    if len(labels) != len(images):
        raise _idx_error(label_file, f"holds {len(labels):,} labels for {len(images):,} images "
                         f"in {image_file.name}")
    if len(labels) and labels.max() >= classes:
        raise _idx_error(label_file, f"holds label {labels.max()}; expected 0..{classes - 1}")
    return images, labels.astype(np.int64)


def split_table(name: str, split: str, path: str | None, local: datasets.DatasetDict | None,
                cache_dir: str | None = None, spec: DatasetSpec | None = None) -> datasets.Dataset:
    """``split`` of ``name`` from the hub (``path`` None) or ``local``, the ``open_local`` copy at
    ``path``; its image column left undecoded. ``spec``: the user's own data (``own_spec``)."""
    spec = spec or DATASETS[name]
    if path is None:
        table = load_hub_split(name, split, cache_dir)
    else:
        aliases = (split, "valid", "val") if split == "validation" else (split,)
        names = [s for s in aliases if s in local]
        if not names:
            raise unknown(f"split of data.path {path!r}", split, local.keys())
        table = local[names[0]]
    missing = sorted({spec.image_key, spec.label_key} - {None} - set(table.column_names))
    if missing:
        raise UserError(f"{name} split {split!r} has no column {', '.join(missing)}; "
                        f"columns: {', '.join(table.column_names)}")
    return table.cast_column(spec.image_key, datasets.Image(decode=False))


def column_values(table: datasets.Dataset, key: str) -> np.ndarray:
    return np.asarray(table.select_columns([key]).with_format("numpy")[key])


def split_labels(name: str, table: datasets.Dataset, split: str,
                 spec: DatasetSpec | None = None) -> tuple[np.ndarray, list | None]:
    """Labels ``[N]`` in the spec's class order (class folders mapped by ``class_list``), and the
    class names the table gives in that order (None: no ``ClassLabel``). Unlabelled data (the
    spec's ``label_key`` None): -1 for every row, which only a fine-tune would read."""
    spec = spec or DATASETS[name]
    if spec.label_key is None:
        return np.full(len(table), -1, np.int64), None
    num_classes = spec.num_classes
    feature, labels = table.features[spec.label_key], column_values(table, spec.label_key)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    file = spec.class_list
    order = (Path(__file__).parent / file).read_text().split() if file else []
    if names and set(names) & set(order):
        if strangers := sorted(set(names) - set(order)):
            raise unknown(f"{name} class folder", strangers[0], order)
        labels, names = np.array([order.index(n) for n in names])[labels], order
    if names and len(names) != num_classes:
        raise UserError(f"{name} column {spec.label_key!r} has {len(names)} "
                        f"classes; expected {num_classes}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise UserError(f"{name} split {split!r} has labels in [{labels.min()}, "
                        f"{labels.max()}]; expected 0..{num_classes - 1}")
    return labels.astype(np.int64), names
