"""``python -m distortkd.study``: the evaluation stage of ``make study`` and its best-recipe pick.

``evaluate ROOT --images N [OVERRIDE ...]`` scores every finished full fine-tune under
``ROOT/finetune`` at the study's budget (``study.steps``; the convergence check's longer runs are
read for their own test accuracy only) on the same N corrupted test images: mask, noise and blur at the study's severities (``severities`` of
``experiment=study_evaluate``) and every held-out ImageNet-C style corruption x 5 severities, with
accuracy and the diagnostics against the teacher on the clean images (cos, CKA, attention) in
every cell; and every finished distilled student before fine-tuning (diagnostics only: the
referee's test of whether representation recovery transfers to corruptions never seen), beside
the teacher's own diagnostics on the same distorted images (``teacher_*``: where the student
started). It writes one run folder per run scored, ``ROOT/evaluate/<run name>_study``, in
the contract of :mod:`distortkd.rundir` (``config.yaml``; ``metrics.json`` with ``status``, the
``rows`` of ``distortkd-evaluate`` plus ``grid``: ``severity`` or ``heldout``, ``stage``:
``finetuned`` or ``distilled``, and the config); finished ones are skipped, so a rerun only adds
new runs.

Why not ``distortkd-evaluate -m``: it corrupts the test images anew for every model, and on this
machine its held-out suite costs ~4 min per model at 1,000 images (fog draws a 256² plasma map
per image: 70 s per 1,000 images over its 5 severities, measured); here each cell is corrupted
once, with the same per-sample seeds for every model (which also makes the comparisons paired).

``best ROOT`` prints the fine-tune distortion and the distillation distortion of the recipe (loss
``multilevel``) with the highest held-out accuracy, mean over cells and seeds: where
``make study`` runs the loss ablations.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distortkd import CONF, distortions, rundir
from distortkd.build import build_model
from distortkd.corruptions import heldout_suite
from distortkd.diagnostics import representation_report
from distortkd.draws import sample_seeds
from distortkd.errors import UserError
from distortkd.evaluation import load_finetuned
from distortkd.modules import load_encoder_weights, run_checkpoint
from distortkd.runs import load_rows
from distortkd.vit import FrozenTeacher

SUITE = "study"


def study_config(root: Path, images: int, overrides: Sequence[str] = ()):
    """The composed ``experiment=study_evaluate`` config with ``images`` test images and the
    Hydra ``overrides`` the study's stages share (e.g. ``study.steps=4`` in its smoke version)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("evaluate", overrides=["experiment=study_evaluate", f"paths.root={root.parent}",
                                              f"data.limit_eval={images}", "trainer=cpu", *overrides])


def finished(root: Path, task: str) -> list[Path]:
    """Finished run folders under ``root/<task>`` (fine-tunes: full mode only). A stale one (built
    on a checkpoint that has changed since, ``rundir.stale``) is skipped, with one line saying why."""
    found = []
    for run in sorted((root / task).glob("*")):
        metrics, _ = rundir.read_metrics(run)
        cfg, _ = rundir.read_config(run)
        if metrics and metrics.get("status") == "ok" and cfg and cfg["finetune"]["mode"] == "full":
            if (why := rundir.stale(cfg, run)) is not None:
                print(f"study: skipping stale {run}: {why}", file=sys.stderr)
                continue
            found.append(run)
    return found


def cells(cfg) -> list[tuple[str, str, float, distortions.Distortion]]:
    """``(grid, name, severity, distortion)``: the families' severities, then the held-out suite."""
    out = [("severity", fam, float(s), distortions.at_severity(fam, s))
           for fam in cfg.families for s in cfg.severities[fam]]
    return out + [("heldout", c.name, float(c.severity), c) for c in heldout_suite(cfg.model.in_chans)]


def test_images(cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The first ``data.limit_eval`` test images ``[N, C, H, W]`` in [0, 1], labels, indices,
    and the dataset's class count."""
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("test")
    parts = [(b["image"], b["label"], b["index"]) for b in dm.device_batches(dm.test_dataloader(), "cpu")]
    x, y, index = (torch.cat(p) for p in zip(*parts, strict=True))
    return x, y, index, dm.num_classes


def _checkpoint(run: Path, cfg: dict) -> Path:
    """A fine-tune's checkpoint that scored its test split (``finetune.test_ckpt``); a distilled
    student's that its fine-tunes start from (init=auto: best, else last)."""
    if cfg["task"] == "distill":
        return run_checkpoint(run)
    return run / "checkpoints" / f"{cfg['finetune'].get('test_ckpt', 'last')}.ckpt"


def _load(run: Path, num_classes: int):
    """``(encoder, head)`` of a fine-tune; ``(encoder, None)`` of a distilled student."""
    cfg, _ = rundir.read_config(run)
    if cfg["task"] == "distill":
        encoder = build_model(OmegaConf.create(cfg["model"]), pretrained=False)
        load_encoder_weights(encoder, _checkpoint(run, cfg))
        return encoder.eval(), None
    module = load_finetuned(OmegaConf.create(cfg), build_model, num_classes, _checkpoint(run, cfg))
    return module.encoder.eval(), module.head.eval()


@torch.no_grad()
def score(encoder, head, teacher_clean, distorted: torch.Tensor, labels: torch.Tensor) -> dict:
    """Diagnostics against the teacher on the clean images and, with a head, top-1 of one model
    on one distorted batch."""
    feats = encoder.features(distorted)
    out = representation_report(feats, teacher_clean)
    if head is not None:
        # The head reads the pooled embedding; for a ViT that is the CLS token ``features``
        # returns (Encoder.forward == features().cls), so one forward serves both.
        out["acc1"] = (head(feats.cls).argmax(-1) == labels).float().mean().item()
    return out


def pending(root: Path, label_fraction: float, steps: int) -> list[tuple[Path, Path]]:
    """``(run, evaluate folder)`` of every finished distillation, and fine-tune at
    ``label_fraction`` and ``steps`` (the 1 % ones and the longer ones serve the budget check
    only), not yet scored."""
    todo = []
    tuned = [r for r in finished(root, "finetune")
             if (c := rundir.read_config(r)[0])["data"]["label_fraction"] == label_fraction
             and c["trainer"]["max_steps"] == steps]
    for run in [*tuned, *finished(root, "distill")]:
        out = root / "evaluate" / f"{run.name}_{SUITE}"
        metrics, _ = rundir.read_metrics(out)
        if not (metrics and metrics.get("status") == "ok"):
            todo.append((run, out))
    return todo


def evaluate(root: Path, images: int, overrides: Sequence[str] = ()) -> list[Path]:
    """Writes ``ROOT/evaluate/<run name>_study`` for every fine-tune and distilled student not yet
    scored (students: diagnostics only, before any fine-tune); returns those folders. Every row
    also holds the teacher's own diagnostics on the distorted images (``teacher_*``: where the
    student started)."""
    cfg = study_config(root, images, overrides)
    todo = pending(root, cfg.data.label_fraction, int(cfg.study.steps))
    if not todo:
        print("study evaluate: every run is already scored", file=sys.stderr)
        return []
    x, y, index, num_classes = test_images(cfg)
    teacher = FrozenTeacher(build_model(cfg.model)).eval()
    models = {run: _load(run, num_classes) for run, _ in todo}
    rows = {run: [] for run, _ in todo}
    seeds = sample_seeds(index, int(cfg.seed))  # one draw per image, for every model
    clean = teacher.features(x)
    for grid, name, severity, dist in cells(cfg):
        distorted = dist(x, seeds)
        cell = {"grid": grid, "distortion": name, "severity": severity,
                **{f"teacher_{k}": v for k, v in representation_report(teacher.features(distorted), clean).items()}}
        for run, (encoder, head) in models.items():
            stage = "distilled" if head is None else "finetuned"
            rows[run].append({**cell, "stage": stage, **score(encoder, head, clean, distorted, y)})
        print(f"{grid:>8s} {name:>18s} {severity:>5g}  {len(models)} models", flush=True)
    for run, out in todo:
        _write(out, run, cfg, rows[run], images)
    return [out for _, out in todo]


def _write(out: Path, run: Path, cfg, rows: list[dict], images: int) -> None:
    """One evaluate run folder: the scored run's config as task evaluate, suite study (``stage``:
    finetuned or distilled)."""
    config, _ = rundir.read_config(run)
    ckpt = _checkpoint(run, config)
    stage = "distilled" if config["task"] == "distill" else "finetuned"
    config = {**config, "task": "evaluate", "suite": SUITE, "run_name": out.name,
              "evaluation": {"stage": stage, "images": images, "corruption_seed": int(cfg.seed),
                             "severities": OmegaConf.to_container(cfg.severities)},
              "provenance": {"checkpoint": rundir.checked_upstream(ckpt)}}
    metrics = {"status": "ok", "suite": SUITE, "stage": stage, "rows": rows}
    if stage == "finetuned":
        metrics["mean_acc1"] = sum(r["acc1"] for r in rows) / len(rows)
    clean, bad = rundir.finite_json({**metrics, "config": config})
    if bad:  # the contract: a non-finite value fails the run instead of being stored
        clean = {"status": "failed", "error": f"non-finite values: {', '.join(bad[:8])}", "config": config}
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    rundir.write_json(out / "metrics.json", clean)


def best_recipe(root: Path) -> tuple[str, str]:
    """(fine-tune distortion, distillation distortion) of the student recipe with the highest mean
    held-out accuracy (10 % labels, loss multilevel)."""
    rows = load_rows([root / "evaluate"]) if (root / "evaluate").is_dir() else None
    if rows is None or rows.empty:
        raise UserError(f"no study evaluation under {root / 'evaluate'}; run `python -m distortkd.study evaluate` first")
    sel = rows[rows["method"].eq("ours") & rows["grid"].eq("heldout") & rows["stage"].eq("finetuned") & rows["loss.name"].eq("multilevel")
               & rows["data.label_fraction"].eq(0.1)]
    if sel.empty:
        raise UserError("no held-out rows of distilled students (method ours, 10 % labels) to pick from")
    mean = sel.groupby(["distortion.name", "pretrain.distortion"])["acc1"].mean()
    return mean.idxmax()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distortkd.study", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="score every finished fine-tune under ROOT")
    ev.add_argument("root", type=Path, help="the study's run folder (<runs>/study)")
    ev.add_argument("--images", type=int, default=500, help="test images per cell")
    ev.add_argument("overrides", nargs="*", help="Hydra overrides of the study's stages (study.steps=...)")
    best = sub.add_parser("best", help="print the best recipe: fine-tune and distillation distortion")
    best.add_argument("root", type=Path)
    opts, extra = p.parse_known_args(argv)  # overrides may follow --images (argparse stops at it)
    if extra and (opts.command != "evaluate" or any(a.startswith("-") for a in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        opts.overrides = [*opts.overrides, *extra]
    try:
        if opts.command == "evaluate":
            if opts.images < 1:
                raise UserError(f"--images {opts.images}; accepted: an integer >= 1")
            done = evaluate(opts.root, opts.images, opts.overrides)
            print(f"study evaluate: {len(done)} runs scored", file=sys.stderr)
        else:
            print(*best_recipe(opts.root))
    except (UserError, HydraException, OmegaConfBaseException) as err:  # a bad override too
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
