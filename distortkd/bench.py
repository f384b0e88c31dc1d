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
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from distortkd.distortions import PRESETS, Distortion, build
from distortkd.errors import UserError
from distortkd.losses import make_loss
from distortkd.steps import distill_loss, supervised_loss
from distortkd.timing import (
    DTYPES,
    TINY,
    Bench,
    Result,
    flops_per_image,
    header,
    peak_tflops,
    ratios,
    render,
    train_step,
)
from distortkd.vit import FrozenTeacher, extract_features


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


def distill_loss_fn(b: Bench, teacher: FrozenTeacher, distortion: Distortion, gamma: float):
    """A fresh student and ``loss(images)`` of its distillation from ``teacher``."""
    student, loss = b.encoder().train(), make_loss("multilevel", gamma=gamma)  # γ 0: no attention taps

    def loss_of(images: Tensor) -> Tensor:
        return distill_loss(student, teacher, distortion, loss, images)["loss"]

    return [*student.parameters()], loss_of


def supervised_loss_fn(b: Bench, distortion: Distortion):
    """A fresh student with a linear head and ``loss(images, labels)`` of its fine-tuning."""
    student = b.encoder().train()
    head = nn.Linear(student.embed_dim, b.args.classes).to(b.device)

    def loss_of(images: Tensor, labels: Tensor) -> Tensor:
        return supervised_loss(student, head, distortion, images, labels)[0]

    return [*student.parameters(), *head.parameters()], loss_of


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


def cmd_data(b: Bench) -> tuple[list[Result], dict]:
    """Images/s of the training DataLoader of ``ImageDataModule`` per worker count."""
    from distortkd import bench_data  # imports Lightning and the data stack

    return bench_data.cmd_data(b)


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
    cache = sub.add_parser("cache", help="training loader images/s: PIL path vs uint8 cache")
    cache.add_argument("--n", type=int, default=512, help="generated JPEGs (>= 100)")
    cache.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    cache.add_argument("--batch", type=int, default=64)
    cache.add_argument("--image-size", type=int, default=224)
    cache.add_argument("--repeats", type=int, default=3)
    cache.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    return p


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]  # argparse reports a ValueError itself


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


def _cache(args: argparse.Namespace) -> int:
    """``distortkd-bench cache``: prints the PIL path vs uint8 cache table (no --json)."""
    if args.n < 100:
        raise UserError(f"--n {args.n} leaves imagenet100 classes empty; accepted: >= 100")
    from distortkd import bench_data  # imports Lightning and the data stack

    bench_data.cache_bench(args.n, args.workers, args.batch, args.image_size, args.repeats,
                           args.batches)
    return 0


COMMANDS = {"taps": cmd_taps, "step": cmd_step, "distort": cmd_distort, "data": cmd_data}


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv``, runs the sub-command, prints the table and writes ``--json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "gpu":
            from distortkd import bench_gpu  # imports Lightning and the data stack

            return bench_gpu.main(args, argv)
        if args.command == "cache":
            return _cache(args)
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
