"""A user's own data (``data=folder``, ``data=hub``): no ``DATASETS`` entry, the spec (splits,
image and label columns, class names) is read from the data itself; anything it cannot use is
refused in one line that names the folder, split or column.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

from distortkd.errors import UserError, unknown
from distortkd.sources import LOAD_ERRORS, OWN, DatasetSpec, column_values, hub_load

VAL_SPLITS = ("validation", "valid", "val", "dev")  # what `datasets` and users call a val split


def check_options(h) -> None:
    """What ``folder`` and ``hub`` need (``h``: the datamodule's hyperparameters): a folder path; a
    hub id or local copy; roles by name; and that no other dataset is given their options."""
    own = h.name in OWN
    for ok, bad in [
        (h.name != "folder" or h.path, "data=folder needs data.path=<image folder>"),
        (h.name != "hub" or h.hub_id or h.path,
         "data=hub needs data.hub_id=<hub dataset id> or data.path=<local copy>"),
        (own or not any((h.hub_id, h.image_column, h.label_column, h.splits)),
         f"hub_id, image_column, label_column and splits are for data=folder and data=hub, not "
         f"{h.name}"),
        (not h.splits or set(h.splits) <= {"train", "val", "test"},
         f"splits keys {sorted(h.splits or [])}; accepted: train, val, test"),
    ]:
        if not ok:
            raise UserError(bad)


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, by the extensions `datasets`' imagefolder reads."""
    exts = datasets.packaged_modules.imagefolder.ImageFolder.EXTENSIONS
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts]


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_layout(path: str | Path) -> list[str]:
    """The sorted class-folder names of the image folder at ``path`` ([] for unlabelled images).

    Accepted: ``train/<class>/*``, optional ``val/`` (or ``validation/``, ``valid/``, ``dev/``)
    and ``test/`` alike; ``<class>/*`` (train only); ``train/*`` or ``*`` (unlabelled). Refused in
    one line: a missing or empty folder, a class folder with no images, images next to class
    folders, a val/test class that train lacks.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"data.path {str(path)!r} is not a folder" if path.exists()
                        else f"data.path {str(path)!r} does not exist")
    names = {p.name: p for p in _subfolders(path)}
    splits = {s: names[s] for s in ("train", *VAL_SPLITS, "test") if s in names}
    if splits and "train" not in splits:
        raise UserError(f"data.path {str(path)!r} has {', '.join(splits)} but no train/ folder")
    classes = {s: _classes(folder) for s, folder in (splits or {"train": path}).items()}
    train = classes["train"]
    for split, found in classes.items():
        if bool(found) != bool(train) or not set(found) <= set(train):
            extra = sorted(set(found) - set(train)) or ["(images without class folders)"]
            raise UserError(f"{path / split if splits else path}: class folder {extra[0]!r} is not a "
                            f"train class; train classes: {', '.join(train) or 'none (unlabelled)'}")
    return train


def _classes(folder: Path) -> list[str]:
    """Class-folder names of one split folder ([] when its images lie directly in it)."""
    images, subs = _images_in(folder), _subfolders(folder)
    if not images and not subs:
        raise UserError(f"{folder} holds no images (accepted: .png, .jpg, .jpeg, .bmp, .tif, ...)")
    if images and subs:
        raise UserError(f"{folder} holds both images and sub-folders ({subs[0].name}/); accepted: "
                        "class folders only, or images only (unlabelled)")
    for sub in subs:
        if not _images_in(sub):
            raise UserError(f"class folder {str(sub)!r} holds no images")
    return [p.name for p in subs]


def unlabelled_error(where: str, kind: str, names: list | None, labelled: bool) -> UserError | None:
    """Why own data at ``where`` cannot serve a fine-tune or an evaluation (no labels, or fewer
    than 2 classes: ``names``), as the one-line error; None when it can."""
    if not labelled:
        why = ("no class folders (train/<class>/...), so no labels" if kind == "folder"
               else "no label column (data.label_column), so no labels")
        return UserError(f"{where} has {why}; a fine-tune or evaluation needs labelled images")
    if len(names) < 2:
        return UserError(f"{where} has {len(names)} class ({', '.join(names)}); a fine-tune or "
                         "evaluation needs at least 2 classes")
    return None


def open_folder(path: str | Path, cache_dir: str | None = None) -> datasets.DatasetDict:
    """The image folder at ``path`` through `datasets`' imagefolder builder (labels = the sorted
    class folders; none when ``folder_layout`` finds no class folders)."""
    classes = folder_layout(path)
    try:
        return datasets.load_dataset("imagefolder", data_dir=str(Path(path).expanduser()),
                                     drop_labels=not classes, cache_dir=cache_dir)
    except LOAD_ERRORS as err:
        raise UserError(f"data.path {str(path)!r} cannot be read as an image folder: "
                        f"{str(err).strip().split(chr(10))[0][:160]}") from None


def open_hub(hub_id: str, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Every split of the hub dataset ``hub_id`` (offline handling as ``load_hub_split``)."""
    return hub_load(hub_id, hub_id, None, cache_dir)


def own_spec(tables: datasets.DatasetDict, what: str, image_column: str | None = None,
             label_column: str | None = None, splits: dict | None = None) -> DatasetSpec:
    """A spec read from ``tables``' own splits and features; each argument given overrides.

    Splits: ``train``, else the only split; val: validation/valid/val/dev if there; test: test if
    there. Image column: the one ``Image`` feature. Label column: the one ``ClassLabel`` feature,
    else an integer ``label`` column, else none (unlabelled). Class count: the ``ClassLabel``'s
    names, else the largest train label + 1. ``small``: the first train image is at most 96 px.
    """
    roles = _own_splits(tables, what, dict(splits or {}))
    table = tables[roles["train"]]
    image = _own_column(table, what, image_column, datasets.Image, "image")
    label = _own_column(table, what, label_column, datasets.ClassLabel, "label")
    feature = table.features.get(label)
    names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if label is None:
        num_classes = 0
    elif names is not None:
        num_classes = len(names)
    else:
        values = column_values(table, label)
        if not np.issubdtype(values.dtype, np.integer):
            raise UserError(f"{what} label column {label!r} holds {values.dtype} values; accepted: "
                            "integer class indices or a ClassLabel column (data.label_column)")
        num_classes = int(values.max()) + 1 if len(values) else 0
    return DatasetSpec(what, num_classes, roles, image_key=image, label_key=label,
                       small=_first_is_small(table, image), names=names)


def _own_splits(tables: datasets.DatasetDict, what: str, given: dict) -> dict:
    """Role → split name: ``given`` (None: found) checked against the splits that exist."""
    found = {"train": "train" if "train" in tables else next(iter(tables)) if len(tables) == 1
             else None,
             "val": next((s for s in VAL_SPLITS if s in tables), None),
             "test": "test" if "test" in tables else None}
    roles = {r: given.get(r) or found[r] for r in ("train", "val", "test")}
    for role, split in roles.items():
        if split is not None and split not in tables:
            raise unknown(f"split of {what} (data.splits.{role})", split, tables.keys())
    if roles["train"] is None:
        raise UserError(f"{what} has no split named train; set data.splits.train to one of "
                        f"{', '.join(tables)}")
    return {r: s for r, s in roles.items() if s is not None}


def _own_column(table: datasets.Dataset, what: str, given: str | None, kind, fallback: str):
    """The column ``given``, else the one feature of type ``kind``, else ``fallback`` if present
    (None for a missing label column: unlabelled)."""
    columns = table.column_names
    option = "data.image_column" if kind is datasets.Image else "data.label_column"
    if given is not None:
        if given not in columns:
            raise unknown(f"column of {what} ({option})", given, columns)
        return given
    typed = [c for c, f in table.features.items() if isinstance(f, kind)]
    if len(typed) > 1:
        raise UserError(f"{what} has several {kind.__name__} columns ({', '.join(typed)}); "
                        f"set {option} to one of them")
    column = typed[0] if typed else fallback if fallback in columns else None
    if column is None and kind is datasets.Image:
        raise UserError(f"{what} has no image column; set {option} to one of: {', '.join(columns)}")
    return column


def _first_is_small(table: datasets.Dataset, image: str) -> bool:
    """Whether the first image is at most 96 px a side: such tight low-resolution images are
    resized whole, as CIFAR's (``DatasetSpec.small``). An unreadable first image: not small."""
    if not len(table):
        return False
    value = table.cast_column(image, datasets.Image(decode=False))[0][image] or {}
    source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    try:
        with PIL.Image.open(source) as im:
            return max(im.size) <= 96
    except Exception:  # noqa: BLE001 - the training path skips and counts it; here it only sizes
        return False
