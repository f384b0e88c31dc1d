"""``distortkd-evaluate``: a fine-tuned checkpoint over a grid of distortions and severities.

One row per (distortion, severity): top-1 on the distorted test split (seeded per sample, so every
method sees the same corruptions), plus representation diagnostics against the teacher on the
clean images (for the evaluated model and for the untouched teacher on the distorted images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distortkd import benchmarks, distortions
from distortkd.checkpoints import load_checkpoint
from distortkd.diagnostics import RepresentationMeter
from distortkd.draws import sample_seeds
from distortkd.errors import UserError
from distortkd.modules import FinetuneModule
from distortkd.vit import Encoder, FrozenTeacher


def grid_cells(cfg: DictConfig) -> list[tuple[str, float, distortions.Distortion]]:
    """``(name, severity, distortion)`` for every cell of the configured suite. A published
    benchmark's cells (``suite=cifar10c|cifar100c|imagenet_c``) read stored images: identity."""
    if cfg.suite == "heldout":
        from distortkd.corruptions import heldout_suite

        return [(c.name, c.severity, c) for c in heldout_suite(cfg.model.in_chans)]
    if cfg.suite in benchmarks.BENCHMARKS:
        identity = distortions.build("identity")
        return [(name, level, identity) for name, level in benchmarks.cells(cfg.benchmark.extra)]
    if cfg.suite != "paper":
        raise UserError(f"unknown evaluation suite {cfg.suite!r}; accepted: "
                        f"{', '.join(sorted(['heldout', 'paper', *benchmarks.BENCHMARKS]))}")
    cells, axes = [], distortions.with_severity()
    for family in cfg.families:
        # no one severity axis (mixed, compose, ...): every family that has one
        for fam in [family] if family in axes else axes:
            grid = distortions.grid(fam, cfg.severities)  # the record's, unless the config sets one
            cells += [(fam, s, distortions.at_severity(fam, s)) for s in grid]
    return cells


def load_finetuned(cfg: DictConfig, build_model, num_classes: int, path: Path) -> FinetuneModule:
    """The fine-tuned backbone + head in checkpoint ``path``."""
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; run the finetune job first or pass ckpt=")
    module = FinetuneModule(build_model(cfg.model, pretrained=False), num_classes,
                            distortions.build("identity"), optimizer=None, mode=cfg.finetune.mode)
    state = load_checkpoint(path, trust=bool(cfg.get("trust_checkpoint", False)))["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"checkpoint {str(path)!r} does not fit model {cfg.model.name!r}: "
                        f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
    return module


class Diagnostics:
    """What a test pass measures besides top-1 (``FinetuneModule.test_observer``): diagnostics of
    the evaluated encoder, and of the untouched teacher, on the first ``max_batches`` distorted
    batches, each against the teacher on the clean batch. They read the test pass's own distorted
    images and features, so nothing is distorted or encoded twice.

    ``clean_cache`` (batch number → teacher features on the clean batch) is shared by the cells of
    one grid: the test loader is unshuffled, so every cell's batch i is the same clean images.
    """

    def __init__(self, teacher: FrozenTeacher, max_batches: int, clean_cache: dict | None = None):
        self.teacher, self.max_batches = teacher, max_batches
        self.clean_cache = {} if clean_cache is None else clean_cache
        self.ours, self.base = RepresentationMeter(), RepresentationMeter()

    @torch.no_grad()
    def __call__(self, i: int, images, distorted, features) -> None:
        if i >= self.max_batches:
            return
        cache = self.clean_cache
        clean = cache[i] if i in cache else cache.setdefault(i, self.teacher.features(images))
        self.ours.update(features, clean)
        self.base.update(self.teacher.features(distorted), clean)

    def compute(self) -> dict:
        return {**self.ours.compute(), **{f"teacher_{k}": v for k, v in self.base.compute().items()}}


def attention_maps(encoder: Encoder, teacher: FrozenTeacher, baseline: Encoder | None, images, dist, seeds):
    """Head-wise CLS→patch attention probabilities ``[K, heads, gh, gw]`` for figure 4."""
    gh, gw = encoder.grid
    as_map = lambda f: f.attn.float().softmax(-1).unflatten(-1, (gh, gw)).cpu().numpy()  # noqa: E731
    distorted = dist(images, seeds)
    out = {"input": distorted.cpu().numpy(), "clean": images.cpu().numpy(),
           "teacher_clean": as_map(teacher.features(images)), "student": as_map(encoder.features(distorted))}
    if baseline is not None:
        out["baseline"] = as_map(baseline.features(distorted))
    return out


def evaluate_grid(cfg: DictConfig, run_dir: Path, build_model, checkpoint: Path) -> dict:
    """The grid of ``cfg`` for the fine-tuned ``checkpoint`` (the one ``build.upstream`` chose and
    checked, recorded in config.yaml)."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    module = load_finetuned(cfg, build_model, datamodule.num_classes, checkpoint)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = instantiate(trainer_cfg, logger=False, enable_checkpointing=False, callbacks=[],
                          enable_progress_bar=False, enable_model_summary=False)
    device = torch.device("cuda" if trainer_cfg["accelerator"] == "gpu" else "cpu")
    stored = benchmarks.stored_cells(cfg)
    # Stored cells have no clean twin batch to compare with: the teacher serves attention maps only.
    wanted = cfg.diagnostics.teacher and (stored is None or cfg.attention.num_images)
    teacher = (FrozenTeacher(build_model(cfg.model, trust=cfg.get("trust_checkpoint", False))).to(device)
               if wanted else None)
    rows, metrics, clean_cache = [], {}, {}
    for name, severity, dist in grid_cells(cfg):
        module.distortion, module.test_prefix = dist, f"test/{name}/{severity:g}"
        diag = (Diagnostics(teacher, cfg.diagnostics.max_batches, clean_cache)
                if teacher is not None and module.encoder.is_vit and stored is None else None)
        module.test_observer = diag
        if stored is None:
            trainer.test(module, datamodule=datamodule, verbose=False)
        else:
            trainer.test(module, dataloaders=stored.loader(name, severity, datamodule), verbose=False)
        module.test_observer = None
        acc = float(trainer.callback_metrics[f"{module.test_prefix}/acc1"])
        row = {"distortion": name, "severity": severity, "acc1": acc}
        if diag is not None:
            row.update(diag.compute())
        rows.append(row)
        metrics[f"{module.test_prefix}/acc1"] = acc
        print(f"{name:>18s} {severity:>6g}  acc1={acc:.4f}", flush=True)
    if cfg.attention.num_images and teacher is not None and module.encoder.is_vit:
        _save_attention(cfg, run_dir, module, teacher, datamodule, build_model, device)
    extra = {} if stored is None else _benchmark_summary(stored)
    return {**metrics, "rows": rows, "suite": cfg.suite, **extra,
            "mean_acc1": float(np.mean([r["acc1"] for r in rows])) if rows else float("nan")}


def _benchmark_summary(stored: benchmarks.StoredCells) -> dict:
    """What the run read besides its rows: the benchmark, and the images it skipped (said once)."""
    if (line := stored.describe_skipped()) is not None:
        print(line, flush=True)
    return {"benchmark": stored.bench.title, "benchmark/skipped_images": sum(stored.skipped.values()),
            "benchmark/skipped_class_folders": sorted(stored.skipped)}


def _save_attention(cfg, run_dir, module, teacher, datamodule, build_model, device) -> None:
    batch = next(datamodule.device_batches(datamodule.test_dataloader(), device))
    k = int(cfg.attention.num_images)
    images = batch["image"][:k]
    seeds = sample_seeds(batch["index"][:k], cfg.seed)
    baseline = None
    if cfg.attention.baseline_ckpt:
        path = Path(cfg.attention.baseline_ckpt)
        baseline = load_finetuned(cfg, build_model, datamodule.num_classes, path).encoder.to(device)
    from distortkd.build import build_distortion

    dist = build_distortion(cfg.distortion)
    with torch.no_grad():
        maps = attention_maps(module.encoder.to(device).eval(), teacher, baseline, images, dist, seeds)
    np.savez_compressed(run_dir / "attention.npz", **maps)

