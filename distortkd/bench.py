"""Throughput benchmarks: ``distortkd-bench taps|step|distort|data`` (also ``python -m distortkd.bench``).

Each sub-command prints the exact command line, the environment, and one table row per variant:
median and minimum wall ms per iteration over ``--iters`` timed iterations after ``--warmup``
untimed ones, median process CPU ms (CPU device), images/s (batch / median wall ms) and peak memory.
Variants are timed interleaved (A B, B A, A B, ...) so drift hits every variant alike, and ratios
are also given per round. ``--json PATH`` writes the same figures. Models are timm names with random
weights (``pretrained=False``): throughput does not depend on them, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils import flop_counter

from distortkd.distortions import PRESETS, Distortion, build
from distortkd.errors import UserError
from distortkd.losses import multilevel_loss
from distortkd.steps import distill_loss, supervised_loss
from distortkd.vit import Encoder, FrozenTeacher, build_vit, extract_features

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# --tiny: a ViT of a few tens of thousands of parameters, for the tests.
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
# Dense bf16 tensor-core peaks (TFLOP/s with FP32 accumulate, no 2:4 sparsity); the first
# substring of the device name wins, so more specific names come first. Sources: NVIDIA's H100
# datasheet (SXM 1,979 / PCIe 1,513 "with sparsity", i.e. 989 / 756 dense; H200 = H100 SXM
# compute), A100 datasheet (312), L40S datasheet (362.05), Ada whitepaper (RTX 4090: 165.2 with
# FP32 accumulate), RTX A6000 datasheet (309.7 sparse = 154.8 dense), A10 (125), L4 (121), L40 (181).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
                    ("RTX 4090", 165.2), ("A6000", 154.8), ("A10", 125.0))
MEM_NOTE = {"cuda": "peak_MiB: torch.cuda.max_memory_allocated during the variant's own calls",
            "cpu": "peak_MiB: process max RSS (ru_maxrss) after the variant's warm-up, cumulative "
                   "over the rows above it (only increases are the variant's)"}


@dataclass
class Result:
    """Timings of one variant; ``ms`` holds every timed iteration."""

    name: str
    batch: int
    ms: list[float]
    peak_mib: float
    cpu_ms: list[float] | None = None  # process CPU time (all threads), CPU device only
    extra: dict = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)

    @property
    def ips(self) -> float:
        return self.batch / self.median_ms * 1e3

    def row(self) -> dict:
        cpu = {"cpu_ms": statistics.median(self.cpu_ms)} if self.cpu_ms else {}
        return {"variant": self.name, "median_ms": self.median_ms, "min_ms": min(self.ms), **cpu,
                "img/s": self.ips, "peak_MiB": self.peak_mib, **self.extra}


@dataclass
class Bench:
    """What every sub-command needs: the parsed arguments, device and autocast dtype."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype | None

    def autocast(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device.type, self.dtype)

    def infer(self, fn: Callable, *args) -> None:
        with torch.no_grad(), self.autocast():
            fn(*args)

    def sync(self, reset_peak: bool = False) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if reset_peak:
                torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    def measure(self, fns: dict[str, Callable[[], object]], batch: int) -> dict[str, Result]:
        """Warms each variant up in turn, then times ``--iters`` rounds of all variants interleaved.

        The order alternates every round (A B, B A, ...) so neither variant always runs first.
        """
        peak = {}
        for name, fn in fns.items():
            self.sync(reset_peak=True)
            for _ in range(self.args.warmup):
                fn()
            self.sync()
            peak[name] = self.peak_mib()
        ms: dict[str, list[float]] = {name: [] for name in fns}
        cpu: dict[str, list[float]] = {name: [] for name in fns}
        order = list(fns)
        for i in range(self.args.iters):
            for name in order if i % 2 == 0 else order[::-1]:
                self.sync(reset_peak=True)
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name]()
                self.sync()
                ms[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
                if self.device.type == "cuda":
                    peak[name] = max(peak[name], self.peak_mib())
        on_cpu = self.device.type == "cpu"
        return {n: Result(n, batch, ms[n], peak[n], cpu[n] if on_cpu else None) for n in fns}

    def images(self, batch: int | None = None) -> Tensor:
        """Uniform ``[0, 1]`` images ``[B, 3, S, S]`` on the device, fp32 (autocast casts them)."""
        size = self.args.img_size
        return torch.rand(batch or self.args.batch, 3, size, size, device=self.device)

    def encoder(self, name: str | None = None) -> Encoder:
        """The ``--model`` ViT with random weights on the device (same init for every call)."""
        kwargs = dict(TINY) if self.args.tiny else {"img_size": self.args.img_size}
        torch.manual_seed(0)
        return build_vit(name or self.args.model, pretrained=False, **kwargs).to(self.device)


def ratios(label: str, a: Result, b: Result) -> dict[str, float]:
    """``a``'s time over ``b``'s: of medians; median of same-round ratios (cancels drift); of minima
    (other processes only ever add wall time); of median process CPU times (blind to them)."""
    paired = statistics.median(t / u for t, u in zip(a.ms, b.ms, strict=True))
    out = {f"ratio_{label}": a.median_ms / b.median_ms, f"ratio_{label}_paired": paired,
           f"ratio_{label}_min": min(a.ms) / min(b.ms)}
    if a.cpu_ms and b.cpu_ms:  # with --threads 1; OpenMP threads spin while a sibling waits
        out[f"ratio_{label}_cpu"] = statistics.median(a.cpu_ms) / statistics.median(b.cpu_ms)
    return out


def cmd_taps(b: Bench) -> tuple[list[Result], dict]:
    """``forward_features`` vs ``extract_features`` (with and without attention), inference."""
    model, x = b.encoder().backbone.eval(), b.images()
    fns = {"forward_features": model.forward_features,
           "extract_features": partial(extract_features, model),
           "extract_features[no_attn]": partial(extract_features, model, with_attn=False)}
    fns = {k: partial(b.infer, torch.compile(f) if b.args.compile else f, x) for k, f in fns.items()}
    res = b.measure(fns, b.args.batch)
    a, p = res["extract_features"], res["forward_features"]
    summary = {**ratios("extract/plain", a, p), "target_max": 1.03}
    return list(res.values()), summary


def train_step(b: Bench, params, loss_of: Callable[..., Tensor], compile: bool) -> Callable:
    """One optimiser step ``step(*inputs)`` with AdamW (fused on CUDA, foreach on CPU)."""
    fused = b.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused or None, foreach=not fused)
    scaler = torch.amp.GradScaler(b.device.type, enabled=b.dtype is torch.float16)
    forward = torch.compile(loss_of) if compile else loss_of

    def step(*inputs):
        opt.zero_grad(set_to_none=True)
        with b.autocast():
            loss = forward(*inputs)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step


def distill_loss_fn(b: Bench, teacher: FrozenTeacher, distortion: Distortion, gamma: float):
    """A fresh student and ``loss(images)`` of its distillation from ``teacher``."""
    student, loss_fn = b.encoder().train(), partial(multilevel_loss, gamma=gamma)

    def loss_of(images: Tensor) -> Tensor:
        return distill_loss(student, teacher, distortion, loss_fn, images, with_attn=gamma > 0)["loss"]

    return [*student.parameters()], loss_of


def supervised_loss_fn(b: Bench, distortion: Distortion):
    """A fresh student with a linear head and ``loss(images, labels)`` of its fine-tuning."""
    student = b.encoder().train()
    head = nn.Linear(student.embed_dim, b.args.classes).to(b.device)

    def loss_of(images: Tensor, labels: Tensor) -> Tensor:
        return supervised_loss(student, head, distortion, images, labels)[0]

    return [*student.parameters(), *head.parameters()], loss_of


def flops_per_image(b: Bench, loss_of: Callable, *inputs: Tensor) -> float:
    """FLOPs of one forward+backward per image, by ``FlopCounterMode`` (optimizer excluded).

    torch has no formula for the CPU flash-attention kernel; it is given the CUDA kernels' one.
    """
    cpu_sdpa = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_backward_flop_count(g, q, k, v),
    }
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        with b.autocast():
            loss = loss_of(*inputs)
        loss.backward()
    return counter.get_total_flops() / inputs[0].shape[0]


def peak_tflops(b: Bench) -> float | None:
    """``--peak-tflops``, else the bf16 table entry for a CUDA device in bf16, else None."""
    if b.args.peak_tflops or b.device.type != "cuda" or b.dtype is not torch.bfloat16:
        return b.args.peak_tflops
    return peak_bf16_tflops(torch.cuda.get_device_name(b.device))


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a CUDA device from its name (``PEAK_BF16_TFLOPS``); None if unknown."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def step_variants(b: Bench) -> tuple[dict[str, Callable], dict[str, float]]:
    """Step functions (bound to their inputs) and FLOPs per image of every ``step`` variant."""
    teacher = FrozenTeacher(b.encoder())
    distortion = build(b.args.distortion)
    x = b.images()
    y = torch.randint(0, b.args.classes, (b.args.batch,), device=b.device)
    specs = {"supervised": (partial(supervised_loss_fn, b, distortion), (x, y)),
             "distill": (partial(distill_loss_fn, b, teacher, distortion, 1.0), (x,)),
             "distill[no_attn]": (partial(distill_loss_fn, b, teacher, distortion, 0.0), (x,))}
    fns, flops = {}, {}
    for compile in (False, True) if b.args.compile else (False,):
        for name, (make, inputs) in specs.items():
            if compile and name == "distill[no_attn]":
                continue
            params, loss_of = make()
            key = name + "+compile" if compile else name
            fns[key] = partial(train_step(b, params, loss_of, compile), *inputs)
            flops[key] = flops[name] if compile else flops_per_image(b, loss_of, *inputs)
    return fns, flops


def cmd_step(b: Bench) -> tuple[list[Result], dict]:
    """Distillation step vs supervised fine-tune step of the same student, images/s and MFU."""
    fns, flops = step_variants(b)
    res = b.measure(fns, b.args.batch)
    peak = peak_tflops(b)
    for name, r in res.items():
        r.extra["GFLOP/img"] = flops[name] / 1e9
        if peak:
            r.extra["MFU_%"] = 100 * flops[name] * r.ips / (peak * 1e12)
    summary = {"flops": "FlopCounterMode, one fwd+bwd, optimizer excluded", "peak_tflops": peak,
               "flop_ratio_distill/supervised": flops["distill"] / flops["supervised"]}
    for num in ("distill", "distill[no_attn]", "distill+compile"):
        den = "supervised+compile" if num.endswith("+compile") else "supervised"
        if num in res:
            summary.update(ratios(f"{num}/{den}", res[num], res[den]))
    summary["target_max"] = 1.40
    return list(res.values()), summary


def measure_step_ips(b: Bench) -> float:
    """Images/s of the attention-distillation step of ``--model`` at ``--step-batch``."""
    batch = b.args.step_batch or b.args.batch
    params, loss_of = distill_loss_fn(b, FrozenTeacher(b.encoder()), build("mask_weak"), 1.0)
    step = partial(train_step(b, params, loss_of, compile=False), b.images(batch))
    return b.measure({"distill": step}, batch)["distill"].ips


def cmd_distort(b: Bench) -> tuple[list[Result], dict]:
    """Every preset with the global generator and with per-sample seeds, vs the model step."""
    x, seeds = b.images(), torch.arange(b.args.batch, device=b.device) * 1_000_003
    fns = {}
    for name in PRESETS:
        d = build(name)
        fns[name], fns[name + "+seeds"] = partial(b.infer, d, x, None), partial(b.infer, d, x, seeds)
    res = b.measure(fns, b.args.batch)
    step_ips = measure_step_ips(b) if b.args.with_step else b.args.step_ips
    if step_ips:
        for r in res.values():
            r.extra["x_step"] = r.ips / step_ips
    summary = {"step_ips": step_ips, "step_model": b.args.model if b.args.with_step else None,
               "target_min_x_step": 10.0}
    return list(res.values()), summary


def write_imagefolder(root: Path, n: int, classes: int, size=(500, 400)) -> Path:
    """Writes ``n`` random-texture JPEGs (~500×400) in ``classes`` folders under ``root/train``."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        # Upsampled noise compresses like a photo (tens of KB), unlike white noise.
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def cmd_data(b: Bench) -> tuple[list[Result], dict]:
    """Images/s of the training DataLoader of ``ImageDataModule`` per worker count."""
    try:
        from distortkd.data import DATASETS, ImageDataModule
    except ImportError as err:
        raise UserError(f"the data benchmark needs distortkd.data.ImageDataModule ({err})") from None
    classes = DATASETS["imagenet100"].num_classes  # the spec refuses any other class count
    if b.args.num_images < classes:
        raise UserError(f"--num-images {b.args.num_images} leaves imagenet100 classes empty; "
                        f"accepted: >= {classes}")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_imagefolder(Path(tmp) / "images", b.args.num_images, classes)
        for workers in b.args.workers:
            dm = ImageDataModule("imagenet100", path=str(root), image_size=b.args.img_size,
                                 batch_size=b.args.batch, num_workers=workers,
                                 pin_memory=b.device.type == "cuda", cache_dir=f"{tmp}/cache")
            res[f"workers={workers}"] = time_loader(b, dm.train_dataloader())
    return list(res.values()), {"images": b.args.num_images, "classes": classes,
                                "source": "generated JPEG imagefolder, ~500x400, decoded by PIL"}


def time_loader(b: Bench, loader) -> Result:
    """Times ``--iters`` batches after ``--warmup`` (worker start-up), looping over epochs.
    Read ``stream_img/s`` (images / total time): workers prefetch, so one batch's time means little."""
    it = (batch for _ in iter(int, 1) for batch in loader)  # endless; workers persist
    for _ in range(max(1, b.args.warmup)):
        next(it)
    ms, n, start = [], 0, time.perf_counter()
    for _ in range(b.args.iters):
        t0 = time.perf_counter()
        n += len(next(it)["image"])
        ms.append((time.perf_counter() - t0) * 1e3)
    extra = {"stream_img/s": n / (time.perf_counter() - start)}
    return Result(f"workers={loader.num_workers}", loader.batch_size, ms, b.peak_mib(), extra=extra)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distortkd-bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    specs = {"taps": (32, 10, "vit_small_patch16_224", cmd_taps.__doc__),
             "step": (16, 10, "vit_small_patch16_224", cmd_step.__doc__),
             "distort": (64, 10, "vit_base_patch16_224", cmd_distort.__doc__),
             "data": (64, 20, "-", cmd_data.__doc__)}
    for name, (batch, iters, model, doc) in specs.items():
        s = sub.add_parser(name, help=doc.split("\n")[0], description=doc)
        s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
        s.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype")
        s.add_argument("--batch", type=int, default=batch)
        s.add_argument("--img-size", type=int, default=224)
        s.add_argument("--iters", type=int, default=iters, help="timed iterations (batches for data)")
        s.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
        s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
        s.add_argument("--json", type=Path, default=None, help="also write the figures here")
        s.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
        if name != "data":
            s.add_argument("--model", default=model, help="timm ViT name (random init)")
        if name in ("taps", "step"):
            s.add_argument("--compile", action="store_true", help="torch.compile (slow to compile)")
    step, distort, data = sub.choices["step"], sub.choices["distort"], sub.choices["data"]
    step.add_argument("--distortion", default="mask_weak", help="preset applied in both steps")
    step.add_argument("--classes", type=int, default=1000, help="linear head width")
    step.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    distort.add_argument("--step-ips", type=float, default=None, help="distill step img/s to compare")
    distort.add_argument("--with-step", action="store_true", help="measure --model's distill step")
    distort.add_argument("--step-batch", type=int, default=None, help="batch of --with-step")
    data.add_argument("--workers", type=_int_list, default=[0, 1, 2], help="e.g. 0,1,2")
    data.add_argument("--num-images", type=int, default=512)
    gpu = sub.add_parser("gpu", help="the whole training path on one GPU (make bench-gpu)",
                         description="Distillation and supervised steps (eager, compiled, MFU, "
                                     "memory), data path and Lightning overhead; bench.json + bench.md")
    gpu.add_argument("--out", type=Path, default=Path("results/bench-gpu"), help="report folder")
    gpu.add_argument("--tiny", action="store_true", help="the same code paths on a CPU, tiny (tests)")
    return p


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]  # argparse reports a ValueError itself


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()} ({torch.get_num_threads()} threads)"


def _bench(args: argparse.Namespace) -> Bench:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; accepted: cpu")
    if args.iters < 1 or args.warmup < 0 or args.batch < 1:
        raise UserError(f"need --iters >= 1, --warmup >= 0, --batch >= 1; got "
                        f"{args.iters}, {args.warmup}, {args.batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.img_size = TINY["img_size"]
    return Bench(args, torch.device(args.device), DTYPES[args.dtype])


def header(b: Bench, argv: Sequence[str]) -> dict:
    """The environment lines; ``loadavg`` (1, 5, 15 min, at the end) tells whether others ran."""
    a, load = b.args, os.getloadavg()
    return {"command": shlex.join(["distortkd-bench", *argv]), "device": device_name(b.device),
            "torch": torch.__version__, "dtype": a.dtype, "batch": a.batch, "image_size": a.img_size,
            "model": getattr(a, "model", "-") + (" (tiny)" if a.tiny else ""), "warmup": a.warmup,
            "iters": a.iters, "compile": getattr(a, "compile", "-"),
            "loadavg": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"}


def render(env: dict, results: list[Result], summary: dict, device: str) -> str:
    """Header lines, the aligned table, then the summary lines."""
    lines = [f"$ {env['command']}"]
    lines += [f"{k + ':':<11} {v}" for k, v in env.items() if k != "command"]
    rows = [r.row() for r in results]
    cols = list(dict.fromkeys(k for row in rows for k in row))
    table = [cols] + [[_fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines += [""] + ["  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(r, widths, strict=True)))
                     for r in table] + [""]
    lines += [f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()]
    lines.append(MEM_NOTE[device])
    return "\n".join(lines)


def _fmt(v: float | str | None) -> str:
    """Four significant digits, never in exponent notation (``1234``, ``12.35``, ``0.001235``)."""
    if v is None or isinstance(v, str):
        return v or "-"
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.{max(0, 3 - math.floor(math.log10(abs(v))))}f}"


COMMANDS = {"taps": cmd_taps, "step": cmd_step, "distort": cmd_distort, "data": cmd_data}


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv``, runs the sub-command, prints the table and writes ``--json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "gpu":
            from distortkd import bench_gpu  # imports Lightning and the data stack

            return bench_gpu.main(args, argv)
        b = _bench(args)
        results, summary = COMMANDS[args.command](b)
    except UserError as err:
        print(f"distortkd-bench: error: {err}", file=sys.stderr)
        return 2
    env = header(b, argv)
    print(render(env, results, summary, b.device.type), flush=True)
    if args.json:
        out = {"env": env, "results": [{**r.row(), "ms": r.ms} for r in results], "summary": summary}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
