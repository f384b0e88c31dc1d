"""Benchmark timers shared by ``distortkd-bench`` and its GPU report (``bench_gpu``).

Variants are timed interleaved (A B, B A, A B, ...) so drift hits every variant alike; the median
and minimum wall ms per iteration, median process CPU ms (CPU device), images/s and peak memory
are kept per variant, and ratios are also given per round. Nothing here knows a sub-command.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils import flop_counter

from distortkd.vit import Encoder, build_vit

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


def train_step(b: Bench, params, loss_of: Callable[..., Tensor], compile: bool) -> Callable:
    """One optimiser step ``step(*inputs)`` with fused AdamW, as ``conf/optim`` trains."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()} ({torch.get_num_threads()} threads)"


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
