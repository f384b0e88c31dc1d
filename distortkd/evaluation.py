"""``distortkd-evaluate``: a fine-tuned checkpoint over a grid of distortions and severities.

One row per (distortion, severity): top-1 on the distorted test split (seeded per sample, so every
method sees the same corruptions), plus representation diagnostics against the teacher on the
clean images (for the evaluated model and for the untouched teacher on the distorted images).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from distortkd import benchmarks, distortions
from distortkd.checkpoints import load_checkpoint
from distortkd.diagnostics import RepresentationMeter
from distortkd.draws import sample_seeds
from distortkd.errors import UserError
from distortkd.modules import FinetuneModule
from distortkd.vit import Encoder, Features, FrozenTeacher


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


def digest(*tensors: Tensor) -> bytes:
    """A content hash of tensors: dtype, shape and bytes (128-bit BLAKE2b)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.digest()


class Memo:
    """What the jobs of one ``distortkd-evaluate -m`` process compute identically, kept in memory:
    the corrupted test batches (the same test images and per-sample seeds for every method and
    checkpoint of a sweep) and the untouched teacher's features on them (the same teacher). Keys
    are content hashes (``digest``) of the inputs, of the distortion's fields and of the teacher's
    weights, so a hit returns what the computation would (tested against a run without the memo).

    Bounded by ``max_bytes``. When full, entries that the current job (``new_job``: one per
    evaluated checkpoint) has not used go first, oldest first; the current job's own entries are
    never evicted, so a job larger than the memo keeps its first cells for the next job instead of
    each new cell evicting the one the next job will read first (the sequential scan that defeats
    least-recently-used). A sweep whose jobs read other cells (another test set, ``data.limit_eval``,
    suite) thus makes room for them; the seeds of one setting share their cells (the evaluation's
    per-image seeds do not depend on the training seed). ``memo_mib: 0`` (evaluate.yaml's default)
    turns it off.
    """

    def __init__(self, max_bytes: int = 0):
        self.max_bytes, self.bytes, self.hits, self.misses, self.job = max_bytes, 0, 0, 0, 0
        self._store: dict[tuple, tuple[object, int, int]] = {}  # key -> (value, bytes, last job using it)

    def new_job(self) -> None:
        self.job += 1

    def get(self, key: tuple, compute: Callable[[], object]) -> object:
        if key in self._store:
            self.hits += 1
            value, size, _ = self._store.pop(key)  # re-inserted last: the newest use
            self._store[key] = (value, size, self.job)
            return value
        self.misses += 1
        value = compute()
        size = sum(t.nbytes for t in _tensors(value))
        if self.bytes + size > self.max_bytes:  # room from entries only earlier jobs used, oldest first
            for old in [k for k, (_, _, job) in self._store.items() if job < self.job]:
                self.bytes -= self._store.pop(old)[1]
                if self.bytes + size <= self.max_bytes:
                    break
        if self.bytes + size <= self.max_bytes:
            self._store[key], self.bytes = (value, size, self.job), self.bytes + size
        return value

    def distortion(self, dist: distortions.Distortion) -> Callable:
        """``dist`` with its seeded calls memoised; unchanged when the memo is off, or when its
        fields may not tell two settings apart (``_spelled_out``)."""
        if not self.max_bytes or not _spelled_out(dist):
            return dist
        name = f"{type(dist).__module__}.{type(dist).__qualname__}:{dist!r}"

        def call(images: Tensor, seeds: Tensor | None = None) -> Tensor:
            if seeds is None:  # unseeded draws are fresh on every call: never reuse them
                return dist(images, seeds)
            return self.get(("distort", name, digest(images, seeds)), lambda: dist(images, seeds))

        return call

    def teacher(self, teacher: FrozenTeacher, spec: str) -> Callable[[Tensor], Features]:
        """``teacher.features`` memoised by the model's config ``spec`` (the architecture: two
        head counts can share weight shapes), its parameters and buffers (the weights, the input
        normalisation) and the input."""
        if not self.max_bytes:
            return teacher.features
        key = ("teacher", spec, digest(*teacher.parameters(), *teacher.buffers()))
        return lambda images: self.get((*key, digest(images)), lambda: teacher.features(images))


def _spelled_out(value) -> bool:
    """Whether ``repr(value)`` names every setting it computes with: plain values, containers of
    them, and dataclasses (decorated themselves, every attribute a field) made of them. A class
    that keeps state outside its fields, or a tensor field (its repr elides values), is not."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(map(_spelled_out, value))
    if isinstance(value, dict):
        return all(_spelled_out(k) and _spelled_out(v) for k, v in value.items())
    if not (dataclasses.is_dataclass(value) and "__dataclass_fields__" in type(value).__dict__):
        return False
    names = {f.name for f in dataclasses.fields(value)}
    state = getattr(value, "__dict__", None)
    return (state is not None and set(state) <= names
            and all(_spelled_out(getattr(value, n)) for n in names))


def _tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    return [t for t in value if isinstance(t, Tensor)]  # Features


_MEMO = Memo()  # the process's: a Hydra sweep runs its jobs one after the other in one process


def process_memo(max_mib: float) -> Memo:
    """The process's memo, with this job's cap (``memo_mib``); 0 empties it."""
    global _MEMO
    if not max_mib:
        _MEMO = Memo()
    _MEMO.max_bytes = int(max_mib * 2**20)
    _MEMO.new_job()
    return _MEMO


class Diagnostics:
    """What a test pass measures besides top-1 (``FinetuneModule.test_observer``): diagnostics of
    the evaluated encoder, and of the untouched teacher, on the first ``max_batches`` distorted
    batches, each against the teacher on the clean batch. They read the test pass's own distorted
    images and features, so nothing is distorted or encoded twice.

    ``clean_cache`` (batch number → teacher features on the clean batch) is shared by the cells of
    one grid: the test loader is unshuffled, so every cell's batch i is the same clean images.
    ``on_distorted``: the teacher's features on a distorted batch (``Memo.teacher``).
    """

    def __init__(self, teacher: FrozenTeacher, max_batches: int, clean_cache: dict | None = None,
                 on_distorted: Callable[[Tensor], Features] | None = None):
        self.teacher, self.max_batches = teacher, max_batches
        self.clean_cache = {} if clean_cache is None else clean_cache
        self.on_distorted = teacher.features if on_distorted is None else on_distorted
        self.ours, self.base = RepresentationMeter(), RepresentationMeter()

    @torch.no_grad()
    def __call__(self, i: int, images, distorted, features) -> None:
        if i >= self.max_batches:
            return
        cache = self.clean_cache
        clean = cache[i] if i in cache else cache.setdefault(i, self.teacher.features(images))
        self.ours.update(features, clean)
        self.base.update(self.on_distorted(distorted), clean)

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
    memo = process_memo(cfg.get("memo_mib") or 0)  # null: off
    spec = OmegaConf.to_yaml(cfg.model, resolve=True)
    on_distorted = memo.teacher(teacher, spec) if teacher is not None else None
    rows, metrics, clean_cache = [], {}, {}
    for name, severity, dist in grid_cells(cfg):
        module.distortion, module.test_prefix = memo.distortion(dist), f"test/{name}/{severity:g}"
        diag = (Diagnostics(teacher, cfg.diagnostics.max_batches, clean_cache, on_distorted)
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
    if memo.max_bytes:
        print(f"memo_mib, this process so far: {memo.hits} hits, {memo.misses} misses, "
              f"{memo.bytes / 2**20:.0f} of {memo.max_bytes / 2**20:.0f} MiB held", flush=True)
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

