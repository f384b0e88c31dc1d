"""Export a distilled (or fine-tuned) encoder as a timm model folder, and load it back.

``distortkd-export <ckpt|run folder> <dir>`` writes

- ``model.safetensors``: the timm backbone's state dict (``num_classes=0``: no head);
- ``config.json``: timm's own hub layout (``architecture``, ``num_classes``, ``num_features``,
  ``model_args``, ``pretrained_cfg``), the preprocessing fields repeated flat at the top, and a
  ``distortkd`` block (distortion, data, loss, source checkpoint, metrics);
- ``README.md``: a Hugging Face model card.

So the folder loads with plain timm, either through
``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=..., mean=..., ...),
**model_args)`` or ``timm.create_model("local-dir:<dir>", pretrained=True)``. The overlay must carry
``mean``/``std``/``input_size``: timm otherwise keeps the registry cfg's (ImageNet, 224 px).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig, OmegaConf

from distortkd import rundir
from distortkd.errors import UserError
from distortkd.modelcard import finetunes_of, init_run, model_card
from distortkd.vit import Encoder

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
# pretrained_cfg fields passed as the overlay: preprocessing, and the two that make timm load our
# file strictly as a native state dict (no head to drop, no .npz custom loader).
OVERLAY_KEYS = ("mean", "std", "input_size", "crop_pct", "interpolation", "num_classes", "custom_load")
# Shown first in the card, with what they measure; other non-train metrics follow.
@dataclass(frozen=True)
class Run:
    """A checkpoint and the run folder that made it.

    Attributes:
        ckpt: the Lightning ``.ckpt`` file.
        run_dir: the folder holding ``config.yaml`` (and ``metrics.json``).
        cfg: the run's resolved config.
        metrics: ``metrics.json`` (empty when absent).
    """

    ckpt: Path
    run_dir: Path
    cfg: DictConfig
    metrics: dict


def resolve_checkpoint(source: str | Path) -> Path:
    """The checkpoint ``source`` names: a ``.ckpt`` file, or a run folder's best (else last) one."""
    from distortkd.modules import run_checkpoint  # Lightning: only needed for checkpoints

    path = Path(source)
    if path.is_dir():
        if (ckpt := run_checkpoint(path)) is not None:
            return ckpt
        raise UserError(f"run folder {str(path)!r} has no checkpoints/best.ckpt or checkpoints/last.ckpt")
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    return path


def open_run(source: str | Path, allow_unfinished: bool = False) -> Run:
    """Finds the checkpoint and its run's config (beside ``checkpoints/`` or the file).

    A checkpoint of a run that did not finish (metrics.json status not ok) is refused unless
    ``allow_unfinished`` (then a warning): an export or an embedding must not silently come from a
    student killed mid-epoch.
    """
    ckpt = resolve_checkpoint(source)
    places = [ckpt.parent.parent, ckpt.parent]
    run_dir = next((d for d in places if (d / "config.yaml").is_file() or (d / "metrics.json").is_file()), None)
    config, why = rundir.read_config(run_dir) if run_dir is not None else (None, "no config.yaml")
    if config is None:
        raise UserError(f"no config.yaml for checkpoint {str(ckpt)!r} ({why}); looked in "
                        + " and ".join(repr(str(d)) for d in places))
    rundir.checked_upstream(ckpt, allow_unfinished)
    metrics, _ = rundir.read_metrics(run_dir)
    return Run(ckpt, run_dir, OmegaConf.create(config), metrics or {})


def rebuild_encoder(run: Run, trust: bool = False) -> Encoder:
    """The run's architecture with the checkpoint's weights and normalisation, in eval mode.

    ``trust``: allow a checkpoint that needs full unpickling (it may run code when loaded).
    """
    from distortkd.build import build_model  # Lightning: only needed for checkpoints
    from distortkd.modules import load_encoder_weights

    encoder = build_model(run.cfg.model, pretrained=False)
    meta = load_encoder_weights(encoder, run.ckpt, trust=trust)
    if meta.get("mean") and meta.get("std"):  # what the run normalised with, as recorded
        encoder = Encoder(encoder.backbone, tuple(meta["mean"]), tuple(meta["std"]))
    return encoder.eval()


def data_config(cfg: DictConfig, encoder: Encoder) -> dict:
    """The run's eval preprocessing in timm ``pretrained_cfg`` terms.

    ``input_size`` is ``[C, H, W]`` in pixels; ``mean``/``std`` in ``[0, 1]`` pixel units.
    """
    from distortkd.sources import DATASETS

    if encoder.is_vit:
        size = tuple(encoder.backbone.patch_embed.img_size)
    else:
        size = (int(cfg.model.img_size),) * 2
    spec = DATASETS.get(cfg.data.get("name"))
    # data.py resizes small datasets whole (no crop border) and resamples bilinearly (v2.Resize).
    crop = 1.0 if spec is not None and spec.small else cfg.data.get("crop_pct", cfg.model.get("crop_pct", 1.0))
    return {"input_size": [encoder.mean.numel(), *size], "mean": _short(encoder.mean),
            "std": _short(encoder.std), "crop_pct": float(crop), "interpolation": "bilinear",
            "crop_mode": "center"}


def _short(values: torch.Tensor) -> list[float]:
    """float32 values as the shortest decimals that round-trip (0.286, not 0.28600001335144043)."""
    return [float(str(v)) for v in values.flatten().float().numpy()]


def _plain(node) -> object:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def timm_config(run: Run, encoder: Encoder) -> dict:
    """``config.json``: timm's hub layout, flat preprocessing fields and the ``distortkd`` block."""
    backbone, cfg = encoder.backbone, run.cfg
    data = data_config(cfg, encoder)
    arch, _, tag = str(cfg.model.name).partition(".")
    model_args = {**(_plain(cfg.model.get("timm_kwargs")) or {}), "in_chans": data["input_size"][0],
                  "num_classes": backbone.num_classes}
    if encoder.is_vit:
        model_args.setdefault("img_size", data["input_size"][1])
    base = backbone.pretrained_cfg
    pretrained_cfg = {**data, "num_classes": backbone.num_classes, "custom_load": False,
                      **{k: base[k] for k in ("fixed_input_size", "first_conv", "classifier") if k in base}}
    start = cfg.model.get("weights_file") or ("timm hub" if cfg.model.get("pretrained") else "random init")
    if cfg.get("task") == "finetune" and (student := init_run(cfg)) is not None:
        start = f"distilled student of {student}"
    info = {"task": cfg.get("task"), "method": cfg.get("method"), "model": str(cfg.model.name),
            "start_weights": str(start), "upstream_tag": tag or None,
            "distortion": _plain(cfg.get("distortion")),
            "data": cfg.data.get("name"), "loss": _plain(cfg.get("loss")),
            "source_checkpoint": str(run.ckpt.resolve()), "run_dir": str(run.run_dir.resolve()),
            "metrics": {k: v for k, v in run.metrics.items() if isinstance(v, (int, float))}}
    if cfg.get("task") == "finetune":
        info["finetune"] = {"mode": cfg.finetune.mode, "label_fraction": cfg.data.get("label_fraction"),
                            "init": cfg.get("init")}
    return {"architecture": arch, "num_classes": backbone.num_classes,
            "num_features": backbone.num_features, **data, "model_args": model_args,
            "pretrained_cfg": pretrained_cfg, "distortkd": info}


def timm_overlay(config: dict, weights: str | Path) -> dict:
    """``pretrained_cfg_overlay`` that makes ``timm.create_model`` load ``weights`` as exported."""
    cfg = config["pretrained_cfg"]
    overlay = {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in OVERLAY_KEYS if k in cfg}
    return {"file": str(weights), **overlay}


def load_exported(folder: str | Path) -> Encoder:
    """An exported folder as an ``Encoder`` (eval mode) that takes ``[0, 1]`` images.

    Raises:
        UserError: the folder lacks ``config.json`` or ``model.safetensors``.
    """
    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise UserError(f"{str(folder / name)!r} does not exist; export a checkpoint with distortkd-export")
    config = json.loads((folder / CONFIG).read_text())
    model = timm.create_model(config["architecture"], pretrained=True,
                              pretrained_cfg_overlay=timm_overlay(config, folder / WEIGHTS),
                              **config["model_args"])
    return Encoder(model, tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])).eval()


def load_encoder(source: str | Path, trust: bool = False, allow_unfinished: bool = False) -> tuple[Encoder, dict]:
    """``(encoder, preprocessing)`` from an exported folder, a checkpoint or a run folder.

    ``preprocessing`` holds ``input_size`` ``[C, H, W]``, ``crop_pct`` and ``interpolation``.
    ``trust``: allow a checkpoint that needs full unpickling (it may run code when loaded).
    """
    path = Path(source)
    if (path / CONFIG).is_file():
        return load_exported(path), json.loads((path / CONFIG).read_text())["pretrained_cfg"]
    if path.is_dir() and not (path / "checkpoints").is_dir():
        raise UserError(f"{str(path)!r} is neither an exported folder (no {CONFIG}) nor a run folder "
                        "(no checkpoints/)")
    run = open_run(source, allow_unfinished)
    encoder = rebuild_encoder(run, trust)
    return encoder, data_config(run.cfg, encoder)


@torch.no_grad()
def _check_roundtrip(folder: Path, encoder: Encoder, input_size: list[int]) -> None:
    """Reloads the export through timm and compares embeddings of a random batch with the source."""
    x = torch.rand(2, *input_size, generator=torch.Generator().manual_seed(0))
    diff = (load_exported(folder)(x) - encoder(x)).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"exported model differs from the checkpoint by {diff:.3g} (max |Δ|)")


def export(source: str | Path, folder: str | Path, trust: bool = False, allow_unfinished: bool = False) -> Path:
    """Writes ``model.safetensors``, ``config.json`` and ``README.md`` for ``source`` into ``folder``.

    Args:
        source: a distill/finetune ``.ckpt`` or a run folder (its best, else last, checkpoint).
        folder: output folder, created if needed; existing export files are overwritten.
        trust: allow a checkpoint that needs full unpickling (it may run code when loaded).
        allow_unfinished: export a checkpoint of a run that did not finish.

    Returns:
        ``folder``.
    """
    from safetensors.torch import save_file

    if Path(folder).exists() and not Path(folder).is_dir():
        raise UserError(f"output {str(folder)!r} is an existing file; accepted: a folder (new or existing)")
    run = open_run(source, allow_unfinished)
    rundir.check_writable(folder, "export folder", "a writable folder")  # before the weights are loaded
    encoder = rebuild_encoder(run, trust)
    config = timm_config(run, encoder)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.backbone.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _check_roundtrip(folder, encoder, config["input_size"])
    params = sum(v.numel() for v in state.values())
    overlay = timm_overlay(config, folder.resolve() / WEIGHTS)
    card = model_card(config, overlay, params, run.run_dir, run.metrics, finetunes_of(run.cfg, run.run_dir))
    (folder / CARD).write_text(card)
    return folder


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distortkd-export",
        description="Export a distill/finetune checkpoint as a timm model folder "
                    "(model.safetensors, config.json, README.md).")
    p.add_argument("checkpoint", help="a .ckpt file, or a run folder (checkpoints/best.ckpt, else last.ckpt)")
    p.add_argument("out", help="output folder")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that needs full unpickling (it can run code: trusted files only)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export a checkpoint of a run that did not finish (metrics.json status not ok)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distortkd-export``; returns the exit status (2 for a user error)."""
    opts = _parser().parse_args(argv)
    try:
        folder = export(opts.checkpoint, opts.out, trust=opts.trust_checkpoint,
                        allow_unfinished=opts.allow_unfinished)
    except UserError as err:
        print(f"distortkd-export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {folder / WEIGHTS}, {folder / CONFIG}, {folder / CARD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
