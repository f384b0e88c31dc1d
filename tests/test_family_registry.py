"""Adding a distortion is one Python class and one YAML file: a toy family (``toy_family.py``:
``Quantize`` and its ``quant_strong.yaml``) registered at test time appears in the
registry-parametrised tests, the Hydra configs, the evaluation grid, ``mixed`` and the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from toy_family import Quantize, write_config

from distortkd import build, cli, report  # cli: the config resolvers (init_for, ...)
from distortkd import distortions as D
from distortkd.errors import UserError
from distortkd.evaluation import grid_cells

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def toy(tmp_path):
    """Registers ``Quantize`` and writes its YAML into a config folder of the user's; the
    registries are put back afterwards."""
    saved = [(registry, dict(registry)) for registry in (D.DISTORTIONS, D.FAMILIES, D.PRESETS)]
    D.register_distortion(Quantize)
    yield write_config(tmp_path / "my_conf")
    for registry, before in saved:
        registry.clear()
        registry.update(before)


def _cfg(entry: str, conf: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        return compose(config_name=entry, overrides=[f"hydra.searchpath=[file://{conf}]", *overrides])


def test_registry_parametrised_tests_pick_up_a_new_family():
    """``pytest -p toy_family`` registers the toy before collection: the registry-wide tests run
    on it unchanged and pass; the bad-parameter test asks for the new family's bad cases."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "toy_family", "-p", "no:cacheprovider", "-v", "-k", "quant",
         "tests/test_distortions.py", "tests/test_seeded_draws.py"],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if "::" in line and ("PASSED" in line or "FAILED" in line)]
    passed = {line.split("::")[1].split(" ")[0] for line in lines if "PASSED" in line}
    failed = {line.split("::")[1].split(" ")[0] for line in lines if "FAILED" in line}
    assert {"test_every_family_record_is_complete[quantize]",
            "test_every_family_grows_with_severity_over_its_evaluation_grid[quantize]",
            "test_mixed_draws_every_family_as_that_family_at_its_severity[quantize]",
            "test_low_precision_and_autocast[dtype0-quant_strong]"} <= passed, proc.stdout[-3000:]
    assert failed == {"test_constructor_names_parameter_value_and_accepted_range[quantize-=[]]"}, proc.stdout[-3000:]
    assert "registered distortion 'quantize' has no bad-parameter cases here" in proc.stdout


def test_config_file_and_evaluation_grid_come_from_the_class_and_its_yaml(toy):
    cfg = _cfg("evaluate", toy, ["distortion=quant_strong"])
    assert build.build_distortion(cfg.distortion) == D.build("quant_strong") == Quantize(step=0.25)
    cells = grid_cells(cfg)
    assert [(name, s) for name, s, _ in cells] == [("quantize", s) for s in Quantize.record.grid]
    assert all(dist == Quantize(step=s) for _, s, dist in cells)
    chain = _cfg("evaluate", toy, ["distortion=compose"])  # no severity axis: every family's grid
    assert "quantize" in {name for name, _, _ in grid_cells(chain)}
    assert "quantize" in D.build("mixed", families=["quantize"], ranges={"quantize": [0.1, 0.3]}).families


def test_mixed_draws_a_new_family_from_the_range_it_is_given(toy):
    """``mixed`` has parameters for the paper's three families; a new one's range goes in
    ``ranges``, required for it and refused for a family with a parameter of its own."""
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mixed = D.build("mixed", families=["quantize", "mask"], ranges={"quantize": [0.2, 0.2]})
    out, seeds = mixed(x, torch.arange(64)), torch.arange(64)
    quantized = (out == Quantize(step=0.2)(x, seeds)).flatten(1).all(1)
    assert 10 < quantized.sum() < 54  # about half the samples drew quantize, the rest mask
    with pytest.raises(UserError, match=r"mixed ranges None is invalid; accepted: \[low, high\] for quantize"):
        D.build("mixed", families=["quantize"])
    with pytest.raises(UserError, match="unknown mixed ranges family .* 'mask'; accepted: none"):
        D.build("mixed", families=["mask"], ranges={"mask": [0.1, 0.2]})


def _run(root: Path, conf: Path, entry: str, overrides: list[str], metrics: dict) -> None:
    """A finished run folder as the CLI writes it: the composed config and its metrics.json."""
    cfg = _cfg(entry, conf, overrides)
    run = root / entry / cfg.run_name
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run / "metrics.json").write_text(json.dumps({"status": "ok", **metrics, "config": resolved}))


def test_the_report_lists_a_new_family_in_every_table(toy, tmp_path):
    """Table 1 (its preset), tables 2 and 3 (its strong preset, by its label and short name) and
    the severity table (its evaluation rows), without any list in the report naming it."""
    runs = tmp_path / "runs"
    for dist in ("quant_strong", "mask_strong"):
        for method, acc in (("ours", 0.7), ("supervised", 0.6)):
            common = [f"distortion={dist}", f"method={method}"]
            _run(runs, toy, "finetune", ["experiment=table1", *common], {"test/acc1": acc})
            _run(runs, toy, "finetune", ["experiment=table2", "data=cifar10", *common], {"test/acc1": acc})
        _run(runs, toy, "finetune", ["experiment=table3", f"distortion={dist}", "method=ours", "loss=global"],
             {"test/acc1": 0.5})
    rows = [{"distortion": "quantize", "severity": s, "acc1": 0.9 - s} for s in Quantize.record.grid]
    _run(runs, toy, "evaluate", ["experiment=table1", "distortion=quant_strong", "method=ours"],
         {"suite": "paper", "rows": rows, "mean_acc1": 0.7})
    out = tmp_path / "report"
    assert report.main([str(runs), "--out", str(out), "--only", "table1,table2,table3,robustness"]) == 0
    text = (out / "results.md").read_text()
    sections = {name: text.split(f"## {title}")[1].split("\n## ")[0] for name, title in
                (("table1", "Table 1"), ("table2", "Table 2"), ("table3", "Table 3"), ("robustness", "Accuracy"))}
    assert "| quant_strong " in sections["table1"] and "| mask_strong " in sections["table1"]
    assert "(QZ)" in sections["table2"] and "(RM)" in sections["table2"]
    assert "Quantize" in sections["table3"] and "Random Mask" in sections["table3"]
    assert all(f"| quantize / {s:g} " in sections["robustness"] for s in Quantize.record.grid)
