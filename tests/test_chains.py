"""Your own distortion model: compose chains, per-sample ranges, every family from the real configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from distortkd import build, cli
from distortkd import distortions as D
from distortkd.corruptions import CORRUPTIONS
from distortkd.draws import step_seeds
from distortkd.errors import UserError

TINY = ["experiment=test", "data=fashion_mnist", "data.limit_train=64", "data.limit_eval=64",
        "data.batch_size=16", "data.num_workers=0"]


def _cfg(entry: str, overrides: list[str]):
    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        return compose(config_name=entry, overrides=overrides)


@pytest.fixture
def images():
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_compose_config_is_a_pure_function_of_image_and_seed_and_equals_its_steps(images):
    cfg = _cfg("distill", ["distortion=compose"])
    chain = build.build_distortion(cfg.distortion)
    assert [s.family for s in chain.steps] == ["gaussian_blur", "corruption", "corruption"]
    seeds = torch.arange(6) * 1_000_003 + 7
    out = chain(images, seeds)
    assert torch.equal(out, chain(images, seeds))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(chain(images[perm], seeds[perm]), out[perm])  # per sample, not per batch
    one_by_one = images
    for k, step in enumerate(chain.steps):
        one_by_one = step(one_by_one, step_seeds(seeds, k))
    assert torch.equal(out, one_by_one)
    assert not torch.equal(chain(images, seeds + 1), out)
    assert out.shape == images.shape and out.dtype == images.dtype and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("seeded", [True, False])
def test_steps_of_one_sample_draw_independent_streams(seeded):
    """Two noise steps: independent draws add variances (2σ²); a repeated stream would give (2σ)²."""
    sigma = 0.1
    step = {"family": "gaussian_noise", "params": {"sigma": sigma, "clip": False}}
    x = torch.full((8, 1, 64, 64), 0.5)
    out = D.build("compose", steps=[step, step])(x, torch.arange(8) if seeded else None)
    assert abs((out - x).var().item() / (2 * sigma**2) - 1) < 0.05


def test_ranges_and_presets_inside_a_chain(images):
    chain = D.build("compose", steps=[{"family": "mask_weak"},
                                      {"family": "gaussian_blur", "params": {"sigma": [0.5, 2.0]}}])
    assert chain.steps[0] == D.build("mask_weak") and chain.steps[1].sigma == (0.5, 2.0)
    assert not torch.equal(chain(images), chain(images))  # training: the global generator


@pytest.mark.parametrize(
    ("params", "needle", "value"),
    [
        ({"steps": [{"family": "fog"}]}, "unknown distortion 'fog' in compose step 1; accepted: ", "fog"),
        ({"steps": []}, "compose steps [] is invalid; accepted: a non-empty list", []),
        ({"steps": None}, "compose steps None is invalid", None),
        ({"steps": [{"params": {"sigma": 1.0}}]}, "compose step 1 {'params': {'sigma': 1.0}} has no family", None),
        ({"steps": ["mask"]}, "compose step 1 'mask' has no family", None),
        ({"steps": [{"family": "mask", "param": {}}]}, "unknown key param; accepted: family, params", None),
        ({"steps": [{"family": "mask"}, {"family": "gaussian_noise", "params": {"sigma": [0.5, 0.1]}}]},
         "compose step 2: noise sigma range [0.5, 0.1] is invalid", [0.5, 0.1]),
        ({"steps": [{"family": "gaussian_blur", "params": {"sigma": [0.0, 2.0]}}]},
         "blur sigma range [0.0, 2.0] is invalid; accepted: a number or [low, high], 0.1 <= low", [0.0, 2.0]),
        ({"steps": [{"family": "mask", "params": {"ratio": [0.2, 0.5, 0.9]}}]}, "mask ratio range", [0.2, 0.5, 0.9]),
    ],
)
def test_bad_chain_is_one_line_naming_value_and_accepted(params, needle, value):
    with pytest.raises(UserError) as err:
        D.build("compose", **params)
    message = str(err.value)
    assert needle in message and "accepted: " in message and "\n" not in message, message
    assert value is None or repr(value) in message
    if "unknown distortion" in message:  # the registered families, the lazily loaded ones included
        assert all(name in message for name in ("compose", "corruption", "mixed", "gaussian_blur"))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_is_a_training_distortion_from_the_config(images, name, tmp_path, monkeypatch):
    if name == "frost":  # the benchmark's photographs, generated stand-ins under their real names
        from test_corruptions import write_frost_photos

        write_frost_photos(tmp_path)
        monkeypatch.setenv("DISTORTKD_FROST_DIR", str(tmp_path))
    cfg = _cfg("distill", ["distortion=corruption", f"distortion.params.name={name}",
                           "distortion.params.severity=5"])
    dist = build.build_distortion(cfg.distortion)
    assert (dist.name, dist.severity) == (name, 5) and cfg.distortion.name == f"{name}_c5"
    seeds = torch.arange(6)
    out = dist(images, seeds)
    assert out.shape == images.shape and out.dtype == images.dtype and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, dist(images, seeds)) and not torch.equal(out, images)


@pytest.mark.parametrize("distortion", ["compose", "corruption", "noise_range"])
def test_custom_distortions_name_their_runs_and_evaluate_on_every_family(distortion):
    cfg = _cfg("evaluate", [f"distortion={distortion}"])
    from distortkd.checks import check_config
    from distortkd.evaluation import grid_cells

    check_config(cfg, build.build_distortion)
    assert cfg.distortion.name in cfg.run_name and cfg.distortion.name in cfg.finetune_run
    families = {name for name, _, _ in grid_cells(cfg)}
    expected = {"gaussian_noise"} if distortion == "noise_range" else set(D.with_severity())
    assert families == expected


@pytest.mark.slow
def test_corruption_distils_end_to_end_through_the_cli(tmp_path):
    env = {**os.environ, "DISTORTKD_RUNS": str(tmp_path), "CI": "1"}
    exe = Path(sys.executable).parent / "distortkd-distill"
    args = ["distortion=corruption", "distortion.params.name=shot_noise", "distortion.params.severity=3"]
    proc = subprocess.run([str(exe), *TINY, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = list((tmp_path / "test" / "distill").iterdir())
    assert "_shot_noise_c3_" in run.name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok"
    assert metrics["config"]["distortion"]["params"] == {"name": "shot_noise", "severity": 3}
    bad = subprocess.run([str(exe), *TINY, "distortion=compose", "distortion.params.steps.1.family=fog"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: unknown distortion 'fog' in compose step 2; accepted: ")


def _finished_run(root: Path, overrides: list[str], acc1: float) -> None:
    """A finished fine-tune run folder, its config composed from the real configs (as the CLI writes)."""
    from omegaconf import OmegaConf

    cfg = _cfg("finetune", ["experiment=table1", *overrides])
    run = root / cfg.run_name
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "test/acc1": acc1, "config": resolved}))


def test_report_labels_custom_distortions_by_name_and_never_pools_two_chains(tmp_path, capsys):
    from distortkd import report

    _finished_run(tmp_path, ["distortion=compose", "method=ours", "seed=0"], 0.5)
    _finished_run(tmp_path, ["distortion=compose", "method=ours", "seed=1"], 0.7)
    _finished_run(tmp_path, ["distortion=compose", "method=supervised", "seed=0"], 0.4)
    _finished_run(tmp_path, ["distortion=noise_range", "method=ours", "seed=0"], 0.6)
    # same name, another chain: its own row, not pooled with the first chain's seeds
    _finished_run(tmp_path / "other", ["distortion=compose", "method=ours", "seed=0",
                                       "distortion.params.steps.1.params.severity=5"], 0.1)
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out"), "--only", "table1"]) == 0
    text = (tmp_path / "out" / "results.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    header = rows.pop("Distortion")
    ours, supervised = header.index("Ours"), header.index("Supervised")
    compose_rows = {k: v for k, v in rows.items() if k.startswith("compose")}
    assert len(compose_rows) == 2, rows  # the two chains kept apart
    assert sorted(v[ours] for v in compose_rows.values()) == ["10.0", "60.0 ± 14.1"]
    assert any(v[supervised] == "40.0" for v in compose_rows.values())
    assert rows["noise_range"][ours] == "60.0"


@pytest.mark.parametrize(("dtype", "eps"), [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_low_precision_chain_rounds_once_at_the_end(images, dtype, eps):
    """Steps run in float32: the result is the float32 chain's, rounded once to the input dtype."""
    chain = build.build_distortion(_cfg("distill", ["distortion=compose"]).distortion)
    seeds = torch.arange(6)
    low = images.to(dtype)
    out = chain(low, seeds)
    assert out.dtype == dtype
    assert (out.float() - chain(low.float(), seeds)).abs().max() <= eps
