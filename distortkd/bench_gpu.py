"""``distortkd-bench gpu``: the whole training path of one GPU in one command (``make bench-gpu``).

Five sections, each run in its own ``try`` so that one failure (a compile error, an out-of-memory)
is recorded in the report and the others still run:

1. ``distill``: the ViT-B/16 distillation step (``steps.distill_loss`` with the ``multilevel`` loss
   and the ``noise_strong`` distortion of ``conf/``, AdamW) at batch 128 in bf16, eager and compiled.
2. ``supervised``: the supervised fine-tune step of the same student, likewise.
3. ``memory``: peak ``torch.cuda.max_memory_allocated`` of every variant above (reset between them).
4. ``data``: the training loader of ``ImageDataModule`` on a generated hub-layout parquet of JPEGs
   (~500x400), PIL decode in 4/8/16 workers vs ``cache=uint8`` with the crop on the device.
5. ``lightning``: ``distortkd-distill`` itself (200 steps of ViT-S/16 on that parquet) timed by
   ``StepTimer`` vs the raw step of the same model and batch: Lightning's overhead in %.

``--tiny`` runs the same code on a CPU in about a minute (tiny ViT, fp32, small batches, 0/1
workers, 5 CLI steps, no compile): the tests use it. Writes ``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch import Tensor, nn

from distortkd import CONF
from distortkd.bench_data import stream_ips, write_parquet
from distortkd.build import build_distortion, build_loss
from distortkd.errors import UserError
from distortkd.rundir import finite_json, write_json
from distortkd.steps import distill_loss, supervised_loss
from distortkd.timing import (
    DTYPES,
    Bench,
    Result,
    device_name,
    flops_per_image,
    peak_bf16_tflops,
    train_step,
)
from distortkd.vit import FrozenTeacher

NO_CUDA = "no CUDA device; accepted: a CUDA machine, or --tiny for the CPU smoke version"
SECTIONS = {"distill": "Distillation step", "supervised": "Supervised step", "memory": "Peak memory",
            "data": "Data path", "lightning": "Lightning overhead"}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the full GPU run, or ``--tiny`` (the same code paths, small)."""

    tiny: bool
    batch: int            # steps (sections 1, 2, 5) and loaders
    warmup: int           # untimed steps (compilation happens here)
    iters: int            # timed steps
    compile: bool
    workers: tuple[int, ...]
    images: int           # rows of the generated train split (a multiple of batch: whole epochs)
    distinct: int         # distinct JPEGs among them (decoding costs the same; encoding is slow)
    jpeg_size: tuple[int, int]
    cli_steps: int
    cli_skip: int         # CLI steps left out of the timing (start-up, cudnn autotuning)
    cli_workers: int


FULL_PLAN = Plan(False, 128, 3, 20, True, (4, 8, 16), 2560, 256, (500, 400), 200, 20, 12)
TINY_PLAN = Plan(True, 4, 1, 2, False, (0, 1), 200, 20, (64, 48), 5, 1, 0)


def mfu(flops_per_image: float, images_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation in %: achieved FLOP/s over the device's peak; None when unknown."""
    if not peak_tflops:
        return None
    return 100 * flops_per_image * images_per_s / (peak_tflops * 1e12)


def _bench(plan: Plan, model: str, device: torch.device) -> Bench:
    img = 32 if plan.tiny else 224
    args = argparse.Namespace(tiny=plan.tiny, img_size=img, model=model, batch=plan.batch,
                              warmup=plan.warmup, iters=plan.iters, classes=100)
    return Bench(args, device, None if plan.tiny else DTYPES["bf16"])


def _conf(group: str, name: str):
    return OmegaConf.load(Path(CONF) / group / f"{name}.yaml")


def _distill(b: Bench):
    """``(params, loss(images))`` of the training run's distillation step (``conf/`` defaults)."""
    teacher, student = FrozenTeacher(b.encoder()), b.encoder().train()
    loss = build_loss(_conf("loss", "multilevel"))
    distortion = build_distortion(_conf("distortion", "noise_strong"))
    x = b.images()

    def loss_of(images: Tensor) -> Tensor:
        return distill_loss(student, teacher, distortion, loss, images)["loss"]

    return [*student.parameters()], loss_of, (x,)


def _supervised(b: Bench):
    """``(params, loss(images, labels))`` of fine-tuning the same student with a linear head."""
    student = b.encoder().train()
    head = nn.Linear(student.embed_dim, b.args.classes).to(b.device)
    distortion = build_distortion(_conf("distortion", "noise_strong"))
    x = b.images()
    y = torch.randint(0, b.args.classes, (b.args.batch,), device=b.device)

    def loss_of(images: Tensor, labels: Tensor) -> Tensor:
        return supervised_loss(student, head, distortion, images, labels)[0]

    return [*student.parameters(), *head.parameters()], loss_of, (x, y)


def _free(b: Bench) -> None:
    """Drops the last variant's tensors and compiled graphs so the next one's peak is its own."""
    gc.collect()
    torch._dynamo.reset()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()


def step_section(b: Bench, make: Callable, compile: bool, peak: float | None) -> dict:
    """img/s, ms, MFU and peak memory of one step, eager (and compiled): each variant alone,
    its own failure recorded. FLOPs per image are counted once, on the eager step."""
    out: dict = {"model": b.args.model, "batch": b.args.batch, "variants": {}}
    for compiled in (False, True) if compile else (False,):
        name = "compile" if compiled else "eager"
        try:
            params, loss_of, inputs = make(b)
            if "GFLOP/img" not in out:
                out["GFLOP/img"] = flops_per_image(b, loss_of, *inputs) / 1e9
            step = partial(train_step(b, params, loss_of, compiled), *inputs)
            r: Result = b.measure({name: step}, b.args.batch)[name]
            out["variants"][name] = {"img/s": r.ips, "median_ms": r.median_ms, "min_ms": min(r.ms),
                                     "MFU_%": mfu(out["GFLOP/img"] * 1e9, r.ips, peak),
                                     "peak_MiB": r.peak_mib}
        except Exception as err:  # noqa: BLE001 -- a failed compile must not lose the eager figures
            out["variants"][name] = {"error": _one_line(err)}
        finally:
            params = loss_of = inputs = step = None
            _free(b)
    return out


def _one_line(err: BaseException) -> str:
    traceback.print_exception(err, file=sys.stderr)  # the whole story goes to the console
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"



def data_section(plan: Plan, device: torch.device, root: Path, cache_dir: str, step_ips) -> dict:
    """PIL decode vs uint8 cache, img/s per worker count, and whether either is the bottleneck."""
    from distortkd.data import ImageDataModule

    size = 32 if plan.tiny else 224
    kw = dict(path=str(root), image_size=size, batch_size=plan.batch, cache_dir=cache_dir,
              pin_memory=device.type == "cuda")
    batches = 2 * plan.images // plan.batch
    start = time.perf_counter()
    ImageDataModule("imagenet100", cache="uint8", num_workers=max(plan.workers), **kw).dataset("train")
    out: dict = {"images": plan.images, "jpeg": "x".join(map(str, plan.jpeg_size)),
                 "cache_build_s": time.perf_counter() - start, "paths": {}}
    for cache in (None, "uint8"):
        for w in plan.workers:
            dm = ImageDataModule("imagenet100", cache=cache, num_workers=w, **kw)
            crop = dm.to_images if cache else None
            out["paths"][f"{cache or 'pil'}/workers={w}"] = stream_ips(dm.train_dataloader(), device,
                                                                        batches, crop)
    top = max(plan.workers)
    out["step_img/s"] = step_ips
    for path in ("pil", "uint8"):
        ips = out["paths"][f"{path}/workers={top}"]
        out[f"{path}_bottleneck_at_{top}_workers"] = None if step_ips is None else ips < step_ips
    return out


class StepTimer(Callback):
    """Times training steps inside each epoch (validation and checkpoints fall between epochs and
    are left out), from the end of one step to the end of the epoch's last; the first ``skip``
    steps are left out. CUDA is synchronised only at those two points, so the CPU may run ahead
    as it does in training. Writes ``{"spans": [[seconds, images], ...]}`` to ``path``."""

    def __init__(self, path: str, skip: int = 1):
        self.path, self.skip = Path(path), skip
        self.spans: list[list[float]] = []
        self._start: float | None = None
        self._images = 0

    def _now(self, module) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self.skip:
            return
        last = batch_idx + 1 >= trainer.num_training_batches or trainer.global_step == trainer.max_steps
        if self._start is None:
            self._start, self._images = (None if last else self._now(pl_module)), 0
            return
        self._images += len(batch["image"])
        if last:
            self.spans.append([self._now(pl_module) - self._start, self._images])
            self._start = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.write_text(json.dumps({"spans": self.spans}))


def cli_ips(plan: Plan, root: Path, cache_dir: str, tmp: Path) -> float:
    """img/s of ``distortkd-distill`` (``plan.cli_steps`` steps on the parquet at ``root``)."""
    timing = tmp / "steps.json"
    timer = f"{{_target_:distortkd.bench_gpu.StepTimer,path:'{timing}',skip:{plan.cli_skip}}}"
    model = ["experiment=test"] if plan.tiny else [
        "model=vits16", "model.pretrained=false", "trainer=gpu", "logger=csv"]
    overrides = [*model, "data=imagenet100", f"data.path={root}", "data.cache=uint8",
                 f"data.cache_dir={cache_dir}", f"data.batch_size={plan.batch}",
                 f"data.num_workers={plan.cli_workers}", f"trainer.max_steps={plan.cli_steps}",
                 "trainer.max_epochs=-1", "distortion=noise_strong", "loss=multilevel",
                 f"+callbacks.bench_timer={timer}"]
    exe = Path(sys.executable).parent / "distortkd-distill"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "distortkd.cli", "distill"]
    env = {**os.environ, "DISTORTKD_RUNS": str(tmp / "runs")}
    proc = subprocess.run([*cmd, *overrides], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not timing.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"distortkd-distill exited {proc.returncode}: {tail[0]}")
    spans = json.loads(timing.read_text())["spans"]
    seconds, images = map(sum, zip(*spans, strict=True)) if spans else (0, 0)
    if not images:
        raise RuntimeError(f"distortkd-distill timed no steps (spans {spans})")
    return images / seconds


def lightning_section(plan: Plan, device: torch.device, root: Path, cache_dir: str, tmp: Path) -> dict:
    """CLI img/s vs the raw eager step of the same model at the same batch."""
    model = "vit_tiny_patch16_224" if plan.tiny else "vit_small_patch16_224"
    raw = step_section(_bench(plan, model, device), _distill, compile=False, peak=None)
    raw_ips = raw["variants"]["eager"].get("img/s")
    if raw_ips is None:
        raise RuntimeError(f"raw step failed: {raw['variants']['eager']['error']}")
    ips = cli_ips(plan, root, cache_dir, tmp)
    return {"model": model, "batch": plan.batch, "cli_steps": plan.cli_steps,
            "timed_steps_from": plan.cli_skip + 1, "raw_img/s": raw_ips, "cli_img/s": ips,
            "overhead_%": 100 * (raw_ips / ips - 1)}


def _best_ips(section: dict) -> float | None:
    rates = [v["img/s"] for v in section.get("variants", {}).values() if "img/s" in v]
    return max(rates, default=None)


def run(plan: Plan, device: torch.device) -> tuple[dict, dict]:
    """The environment and the five sections (a failed section holds ``{"error": ...}``)."""
    name = device_name(device)
    peak = peak_bf16_tflops(name) if device.type == "cuda" else None
    env = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda or "-",
           "dtype": "fp32" if plan.tiny else "bf16 (autocast)", "batch": plan.batch,
           "peak_bf16_tflops": peak}
    model = "vit_tiny_patch16_224" if plan.tiny else "vit_base_patch16_224"
    b = _bench(plan, model, device)
    sections: dict = {}
    for key, make in (("distill", _distill), ("supervised", _supervised)):
        sections[key] = _guard(lambda make=make: step_section(b, make, plan.compile, peak), key)
    sections["memory"] = _guard(lambda: {f"{k}/{v}": sections[k]["variants"][v]["peak_MiB"]
                                         for k in ("distill", "supervised")
                                         for v in sections[k].get("variants", {})
                                         if "peak_MiB" in sections[k]["variants"][v]}, "memory")
    with tempfile.TemporaryDirectory() as tmp:
        root, cache_dir = Path(tmp) / "imagenet100", f"{tmp}/cache"
        written = _guard(lambda: write_parquet(root, plan.images, plan.distinct, plan.jpeg_size),
                         "writing the JPEG parquet")
        step_ips = _best_ips(sections["distill"])
        sections["data"] = written if isinstance(written, dict) else _guard(
            lambda: data_section(plan, device, root, cache_dir, step_ips), "data")
        sections["lightning"] = written if isinstance(written, dict) else _guard(
            lambda: lightning_section(plan, device, root, cache_dir, Path(tmp)), "lightning")
    return env, sections


def _guard(fn: Callable[[], object], what: str):
    """``fn()``, or ``{"error": ...}`` if it raised; says on stderr what runs (a run of minutes)."""
    print(f"distortkd-bench gpu: {what} ...", file=sys.stderr, flush=True)
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 -- one failed section must not lose the others
        return {"error": _one_line(err)}


def _cell(v) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return "-" if v is None else str(v)


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)]


def _steps_md(sec: dict) -> list[str]:
    lines = [f"{sec['model']}, batch {sec['batch']}, {_cell(sec.get('GFLOP/img'))} GFLOP/image "
             "(FlopCounterMode, forward + backward, optimizer excluded)", ""]
    rows = [[v, r.get("img/s"), r.get("median_ms"), r.get("MFU_%", None) if "error" not in r else None,
             r.get("peak_MiB"), r.get("error", "")] for v, r in sec["variants"].items()]
    return lines + _table(["variant", "img/s", "ms/step (median)", "MFU %", "peak MiB", "error"], rows)


def _data_md(sec: dict) -> list[str]:
    step = sec["step_img/s"]
    rows = [[p, ips, None if step is None else ips / step] for p, ips in sec["paths"].items()]
    lines = [f"{sec['images']} JPEGs {sec['jpeg']} in a hub-layout parquet; uint8 cache built in "
             f"{_cell(sec['cache_build_s'])} s; loader → device (uint8: + crop on the device); "
             f"compared with the fastest distillation variant, {_cell(step)} img/s", ""]
    lines += _table(["path", "img/s", "× distillation step"], rows) + [""]
    for key, value in sec.items():
        if "bottleneck" in key:
            verdict = "unknown (no distillation figure)" if value is None else "yes" if value else "no"
            lines.append(f"- {key.replace('_', ' ')}: **{verdict}**")
    return lines


def _lightning_md(sec: dict) -> list[str]:
    return _table(["model", "batch", "raw step img/s", f"CLI img/s (steps {sec['timed_steps_from']}–"
                   f"{sec['cli_steps']})", "Lightning overhead %"],
                  [[sec["model"], sec["batch"], sec["raw_img/s"], sec["cli_img/s"], sec["overhead_%"]]])


def render_md(command: str, env: dict, sections: dict) -> str:
    """``bench.md``: the environment, then one table per section (or its error)."""
    peak = env["peak_bf16_tflops"]
    lines = ["# distortkd-bench gpu", "", f"`{command}`", ""]
    lines += _table(["device", "torch", "CUDA", "dtype", "batch", "dense bf16 peak"],
                    [[env["device"], env["torch"], env["cuda"], env["dtype"], env["batch"],
                      f"{peak:g} TFLOP/s" if peak else "peak unknown (no MFU)"]])
    render = {"distill": _steps_md, "supervised": _steps_md, "data": _data_md,
              "lightning": _lightning_md,
              "memory": lambda s: _table(["variant", "peak MiB (CUDA: max_memory_allocated; "
                                          "CPU: process max RSS)"],
                                         [[k, v] for k, v in s.items()])}
    for i, (key, title) in enumerate(SECTIONS.items(), 1):
        sec = sections[key]
        body = [f"failed: {sec['error']}"] if "error" in sec else render[key](sec)
        lines += ["", f"## {i}. {title}", "", *body]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, argv: list[str]) -> int:
    """``distortkd-bench gpu``: runs every section, prints and writes ``bench.json``/``bench.md``."""
    if not args.tiny and not torch.cuda.is_available():
        raise UserError(NO_CUDA)
    device = torch.device("cpu" if args.tiny else "cuda")
    command = shlex.join(["distortkd-bench", *argv])
    env, sections = run(TINY_PLAN if args.tiny else FULL_PLAN, device)
    args.out.mkdir(parents=True, exist_ok=True)
    report, bad = finite_json({"command": command, "env": env, "sections": sections})
    report["non_finite"] = bad  # named, never stored as NaN (standard JSON)
    write_json(args.out / "bench.json", report)
    text = render_md(command, env, sections)
    (args.out / "bench.md").write_text(text)
    print(text, flush=True)
    return 0

