"""distortkd-bench: tables parse and match --json, timing is interleaved, compile is exact."""

from __future__ import annotations

import json
import math
import shlex
import types

import pytest
import torch

from distortkd import bench, timing
from distortkd.distortions import PRESETS, build
from distortkd.losses import multilevel_loss
from distortkd.steps import distill_loss
from distortkd.vit import FrozenTeacher

FAST = ["--tiny", "--iters", "2", "--warmup", "1"]


def parse_table(out: str) -> dict[str, dict[str, float | None]]:
    """Rows of the printed table keyed by variant; '-' cells become None."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    cols = lines[start].split()
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        name, *cells = line.split()
        assert len(cells) == len(cols) - 1, line
        rows[name] = {c: None if v == "-" else float(v) for c, v in zip(cols[1:], cells, strict=True)}
    return rows


def run_cli(capsys, tmp_path, argv: list[str]) -> tuple[str, dict, dict]:
    """Runs ``distortkd-bench argv`` fast; checks the command line heads the output and the JSON."""
    full = [*argv, *FAST, "--json", str(tmp_path / "bench.json")]
    assert bench.main(full) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert out.splitlines()[0] == "$ " + data["env"]["command"] == "$ " + shlex.join(["distortkd-bench", *full])
    return out, parse_table(out), data


def check_report(out: str, rows: dict, data: dict, variants: list[str]) -> None:
    """The table has exactly ``variants``, positive figures, and the JSON holds the same numbers."""
    for key in ("device:", "torch:", "dtype:", "batch:", "image_size:", "model:", "warmup:", "iters:"):
        assert any(line.startswith(key) for line in out.splitlines()), key
    assert list(rows) == variants
    assert [r["variant"] for r in data["results"]] == variants
    for result in data["results"]:
        row = rows[result["variant"]]
        assert row["img/s"] > 0 and row["median_ms"] > 0
        assert len(result["ms"]) == 2
        for col, printed in row.items():  # printed with 4 significant digits
            assert printed == pytest.approx(result[col], rel=1e-3, abs=1e-12), (result["variant"], col)


@pytest.mark.slow
def test_taps_table(capsys, tmp_path):
    argv = ["taps", "--batch", "4"]
    out, rows, data = run_cli(capsys, tmp_path, argv)
    check_report(out, rows, data, ["forward_features", "extract_features", "extract_features[no_attn]"])
    ratio = data["summary"]["ratio_extract/plain"]
    medians = rows["extract_features"]["median_ms"] / rows["forward_features"]["median_ms"]
    assert ratio == pytest.approx(medians, rel=2e-3)
    assert f"ratio_extract/plain: {ratio:.3f}" in out


@pytest.mark.slow
def test_step_table(capsys, tmp_path):
    argv = ["step", "--batch", "4", "--peak-tflops", "1"]
    out, rows, data = run_cli(capsys, tmp_path, argv)
    check_report(out, rows, data, ["supervised", "distill", "distill[no_attn]"])
    flops = {name: row["GFLOP/img"] for name, row in rows.items()}
    # The teacher's forward is extra work: distillation costs more FLOPs than fine-tuning.
    assert flops["distill"] > flops["distill[no_attn]"] > flops["supervised"] > 0
    for name, row in rows.items():  # --peak-tflops 1: MFU % = GFLOP/img * img/s / 1000 * 100
        assert row["MFU_%"] == pytest.approx(row["GFLOP/img"] * row["img/s"] / 10, rel=2e-3), name
    assert data["summary"]["ratio_distill/supervised"] > 0


@pytest.mark.slow
def test_distort_table_with_step(capsys, tmp_path):
    argv = ["distort", "--batch", "8", "--with-step", "--model", "vit_small_patch16_224"]
    out, rows, data = run_cli(capsys, tmp_path, argv)
    variants = [v for name in PRESETS for v in (name, name + "+seeds")]
    check_report(out, rows, data, variants)
    step_ips = data["summary"]["step_ips"]
    assert step_ips > 0
    for name, row in rows.items():
        assert row["x_step"] == pytest.approx(row["img/s"] / step_ips, rel=2e-3), name


@pytest.mark.slow
def test_data_table(capsys, tmp_path):
    argv = ["data", "--batch", "8", "--workers", "0,1", "--num-images", "100"]
    out, rows, data = run_cli(capsys, tmp_path, argv)
    check_report(out, rows, data, ["workers=0", "workers=1"])
    assert all(row["stream_img/s"] > 0 for row in rows.values())


def test_measure_interleaves_and_takes_median(monkeypatch):
    args = bench._parser().parse_args(["taps", "--iters", "4", "--warmup", "1"])
    b = bench._bench(args)
    calls, now = [], [0.0]  # a fake clock: each call takes exactly its seconds, whatever the load
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0], process_time=lambda: now[0]))

    def fn(name, seconds):
        calls.append(name)
        now[0] += seconds

    res = b.measure({"a": lambda: fn("a", 0.002), "b": lambda: fn("b", 0.02)}, batch=10)
    # Warm-up A, warm-up B, then rounds that alternate their order.
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(res["a"].ms) == len(res["b"].ms) == 4
    assert res["b"].median_ms == pytest.approx(20) and res["a"].median_ms == pytest.approx(2)
    assert res["b"].ips == pytest.approx(10 / 20 * 1e3)


def test_unknown_model_is_one_line_error(capsys):
    assert bench.main(["taps", "--model", "vit_smal_patch16_224"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vit_smal_patch16_224" in err and "vit_small_patch16_224" in err


def tiny_distillation():
    b = bench._bench(bench._parser().parse_args(["step", "--tiny"]))
    teacher, student = FrozenTeacher(b.encoder()), b.encoder().train()
    torch.manual_seed(1)  # the student differs from the teacher, so every loss term is non-zero
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return b, teacher, student


def test_compiled_distill_step_matches_eager():
    """Same loss terms, and the same losses over three AdamW steps (so the same gradients).

    ``mixed`` with per-sample seeds draws mask, noise and blur in one batch through the int64 hash,
    so inductor's C++ code for every family is compared with eager.
    """
    torch.manual_seed(2)
    images, seeds = torch.rand(4, 3, 32, 32), torch.arange(4) * 1_000_003 + 7
    runs = {}
    for compile in (False, True):
        b, teacher, student = tiny_distillation()
        distortion = build("mixed")
        terms = distill_loss(student, teacher, distortion, multilevel_loss, images, seeds)

        def loss_of(x, student=student, teacher=teacher, distortion=distortion):
            return distill_loss(student, teacher, distortion, multilevel_loss, x, seeds)["loss"]

        torch._dynamo.reset()
        step = timing.train_step(b, [*student.parameters()], loss_of, compile=compile)
        runs[compile] = {k: v.item() for k, v in terms.items()}, [step(images).item() for _ in range(3)]
    (eager_terms, eager_steps), (terms, steps) = runs[False], runs[True]
    assert all(v > 0 for v in eager_terms.values()), eager_terms
    assert terms == pytest.approx(eager_terms, rel=1e-4, abs=1e-6)
    assert steps == pytest.approx(eager_steps, rel=1e-4, abs=1e-6)
    assert eager_steps[2] < eager_steps[0]  # the optimizer really stepped


@pytest.mark.parametrize("with_seeds", [False, True])
def test_distill_loss_has_no_graph_breaks(with_seeds):
    b, teacher, student = tiny_distillation()
    images = b.images(4)
    seeds = torch.arange(4) if with_seeds else None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(distill_loss)(
        student, teacher, build("mask_weak"), multilevel_loss, images, seeds)
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def test_graph_break_counting_sees_a_break():
    """Control for the test above: a deliberate break in the loss function is counted."""
    b, teacher, student = tiny_distillation()

    def breaking_loss(s, t):
        torch._dynamo.graph_break()
        return multilevel_loss(s, t)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(distill_loss)(
        student, teacher, build("mask_weak"), breaking_loss, b.images(4))
    assert explained.graph_break_count >= 1


# --- distortkd-bench gpu ------------------------------------------------------------------------

def _numbers(tree, path=""):
    """Every (dotted key, number) leaf of a JSON tree (booleans are verdicts, not numbers)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}" if path else k)
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, tree


@pytest.mark.slow
def test_gpu_tiny_reports_every_section(capsys, tmp_path):
    """``gpu --tiny`` runs all five sections on CPU (the real datamodule, cache and CLI included)."""
    from distortkd import bench_gpu

    assert bench.main(["gpu", "--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    sections = data["sections"]
    assert set(sections) == set(bench_gpu.SECTIONS)
    assert not [k for k, s in sections.items() if "error" in s], sections
    assert data["non_finite"] == []
    for key, value in _numbers(sections):
        assert math.isfinite(value), key
        assert value > 0 or key.endswith("overhead_%"), key  # Lightning may time faster by chance
    assert set(sections["distill"]["variants"]) == set(sections["supervised"]["variants"]) == {"eager"}
    assert set(sections["memory"]) == {"distill/eager", "supervised/eager"}
    assert set(sections["data"]["paths"]) == {"pil/workers=0", "pil/workers=1", "uint8/workers=0",
                                              "uint8/workers=1"}
    assert isinstance(sections["data"]["pil_bottleneck_at_1_workers"], bool)
    assert data["env"]["peak_bf16_tflops"] is None  # a CPU has no entry: no MFU
    md = (tmp_path / "bench.md").read_text()
    assert md in capsys.readouterr().out  # printed too
    for title in bench_gpu.SECTIONS.values():
        assert f". {title}\n" in md, title
    assert f"`{data['command']}`" in md and "failed:" not in md and "peak unknown" in md


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 4090", 165.2),
                                        ("NVIDIA RTX A6000", 154.8), ("Tesla T4", None),
                                        ("Intel(R) Xeon(R) Processor", None)])
def test_peak_table_lookup(name, peak):
    assert timing.peak_bf16_tflops(name) == peak


def test_mfu_arithmetic():
    from distortkd.bench_gpu import mfu

    # 20 GFLOP/image at 3,500 img/s = 70 TFLOP/s: 7.07 % of 989 TFLOP/s.
    assert mfu(20e9, 3500.0, 989.0) == pytest.approx(100 * 70 / 989)
    assert mfu(1e12, 1.0, 2.0) == pytest.approx(50.0)
    assert mfu(20e9, 3500.0, None) is None


def test_gpu_without_cuda_is_one_line_exit_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("distortkd-bench: error: no CUDA device; accepted: a CUDA machine, "
                                    "or --tiny for the CPU smoke version")
    assert not (tmp_path / "bench.json").exists()


def test_failed_compile_keeps_eager_figures(monkeypatch):
    """A compile failure is recorded in its variant; the eager figures of the section remain."""
    from distortkd import bench_gpu

    real = bench_gpu.train_step

    def failing(b, params, loss_of, compile):
        if compile:
            raise RuntimeError("inductor exploded\nsecond line")
        return real(b, params, loss_of, compile)

    monkeypatch.setattr(bench_gpu, "train_step", failing)
    b = bench_gpu._bench(bench_gpu.TINY_PLAN, "vit_tiny_patch16_224", torch.device("cpu"))
    sec = bench_gpu.step_section(b, bench_gpu._distill, compile=True, peak=1.0)
    assert sec["variants"]["compile"] == {"error": "RuntimeError: inductor exploded"}
    eager = sec["variants"]["eager"]
    assert eager["img/s"] > 0 and sec["GFLOP/img"] > 0
    assert eager["MFU_%"] == pytest.approx(sec["GFLOP/img"] * eager["img/s"] / 10)  # peak 1 TFLOP/s
    md = bench_gpu._steps_md(sec)
    assert any(line.startswith("| compile |") and "inductor exploded" in line for line in md)


def test_failed_sections_are_recorded_and_the_others_kept(monkeypatch, tmp_path, capsys):
    """A section that raises becomes ``{"error": ...}`` in the JSON and "failed:" in the Markdown;
    the run still writes both files, with the figures of every other section."""
    from distortkd import bench_gpu

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bench_gpu, "data_section", broken)
    monkeypatch.setattr(bench_gpu, "lightning_section", broken)
    assert bench.main(["gpu", "--tiny", "--out", str(tmp_path)]) == 0
    sections = json.loads((tmp_path / "bench.json").read_text())["sections"]
    assert sections["data"] == sections["lightning"] == {"error": "OSError: disk full"}
    assert sections["distill"]["variants"]["eager"]["img/s"] > 0
    assert sections["memory"]["supervised/eager"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert md.count("failed: OSError: disk full") == 2
    assert "disk full" in capsys.readouterr().err  # the traceback goes to the console
