"""The Hydra configs and the three entry points, end to end on a tiny ViT and real Fashion-MNIST."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from distortkd import build, cli
from distortkd.errors import UserError

CONF = cli.CONF
EXPERIMENTS = sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml"))
TINY = ["experiment=test", "data=fashion_mnist", "data.limit_train=64", "data.limit_eval=64",
        "data.batch_size=16", "data.num_workers=0"]


def _compose(entry: str, overrides: list[str], root: Path | None = None):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=entry, overrides=overrides)
    if root is not None:
        with open_dict(cfg):
            cfg.paths.root = str(root)
    return cfg


@pytest.mark.parametrize("entry", ["distill", "finetune", "evaluate"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(entry, experiment):
    cfg = _compose(entry, [f"experiment={experiment}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["task"] == entry and resolved["run_name"]
    assert resolved["distortion"]["family"] in ("mask", "gaussian_noise", "gaussian_blur", "identity", "mixed")


# Every option of every group composes, resolves and builds: tests/test_configs.py.


def test_typo_and_unknown_option_are_errors_naming_choices():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="distortion.paramz"):
        _compose("distill", ["distortion.paramz.ratio=0.5"])
    with pytest.raises(Exception, match="mask_strong"):  # Hydra lists the available options
        _compose("distill", ["distortion=mask_strongest"])


def test_distortion_override_from_command_line():
    cfg = _compose("distill", ["distortion=mask_strong", "distortion.params.ratio=0.8"])
    assert build.build_distortion(cfg.distortion).ratio == 0.8
    with pytest.raises(UserError, match="noise sigma -1 is out of range; accepted: sigma >= 0"):
        build.build_distortion(_compose("distill", ["distortion.params.sigma=-1"]).distortion)


def test_init_follows_method():
    assert _compose("finetune", ["method=supervised"]).init == "pretrained"
    assert _compose("finetune", ["method=ours"]).init == "auto"


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """distill -> finetune(init=auto) -> evaluate(ckpt=auto), in-process, tiny."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for task, extra in [("distill", ["logger.attention_every_n_epochs=1"]), ("finetune", ["method=ours"]), ("finetune", ["method=supervised"]),
                        ("evaluate", ["method=ours", "severities.gaussian_noise=[0.2,0.8]",
                                      "attention.num_images=4"])]:
        cfg = _compose(task, TINY + ["distortion=noise_strong"] + extra, root)
        run_dir = root / cfg.experiment / task / cfg.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = getattr(cli, f"run_{task}")(cfg, run_dir)
        out[(task, cfg.method)] = (cfg, run_dir, metrics)
    return out


def test_distill_checkpoint_has_student_only(pipeline):
    cfg, run_dir, metrics = pipeline[("distill", "ours")]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("student.") for k in keys) and not any(k.startswith("teacher.") for k in keys)
    for key in ("val/loss", "val/cos_clean", "val/cos_clean_baseline", "val/loss/attn", "val/attn_kl",
                "val/diag/student/cka_cls", "val/diag/teacher/attn_iou", "val/diag/student/cos_patch"):
        assert key in metrics, key
    png = run_dir / "attention" / "epoch_001.png"  # the per-epoch attention panel
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_finetune_from_distilled_and_from_pretrained(pipeline):
    ours_cfg, ours_dir, ours = pipeline[("finetune", "ours")]
    sup_cfg, sup_dir, sup = pipeline[("finetune", "supervised")]
    _, distill_dir, _ = pipeline[("distill", "ours")]
    for m in (ours, sup):
        assert 0 <= m["test/acc1"] <= 1 and "val/acc1" in m
    # ours started from the distilled student (init=auto), the baseline from the pretrained weights
    # (accuracies of a tiny random model at chance cannot tell them apart: the weights can)
    assert build.provenance(ours_cfg)["init"]["path"] == str((distill_dir / "checkpoints" / "best.ckpt").resolve())
    assert build.provenance(sup_cfg) == {}
    weights = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in (ours_dir, sup_dir)]
    backbone = [k for k in weights[0] if k.startswith("encoder.backbone.")]
    assert backbone and any(not torch.equal(weights[0][k], weights[1][k]) for k in backbone)


def test_evaluate_writes_rows_and_attention(pipeline):
    _, run_dir, metrics = pipeline[("evaluate", "ours")]
    rows = metrics["rows"]
    assert [(r["distortion"], r["severity"]) for r in rows] == [("gaussian_noise", 0.2), ("gaussian_noise", 0.8)]
    assert all(0 <= r["acc1"] <= 1 and -1 <= r["cos_cls"] <= 1 and "teacher_cos_cls" in r for r in rows)
    import numpy as np

    maps = np.load(run_dir / "attention.npz")
    assert maps["student"].shape == (4, 2, 4, 4) and np.allclose(maps["student"].sum((-1, -2)), 1, atol=1e-5)


def test_teacher_frozen_and_student_moves(tmp_path):
    from hydra.utils import instantiate

    from distortkd.modules import DistillModule

    cfg = _compose("distill", TINY, tmp_path)
    student, teacher = build.build_model(cfg.model), build.build_model(cfg.model)
    teacher.load_state_dict(student.state_dict())
    loss_fn = build.build_loss(cfg.loss)
    module = DistillModule(student, teacher, build.build_distortion(cfg.distortion), loss_fn,
                           optimizer=instantiate(cfg.optim.optimizer))
    before_t, before_s = _state(module.teacher), _state(module.student)
    opt = torch.optim.AdamW(module.student.parameters(), lr=1e-3)
    module.train()
    from distortkd.steps import distill_loss

    loss = distill_loss(module.student, module.teacher, module.distortion, loss_fn,
                        torch.rand(4, 3, 32, 32), None)["loss"]
    loss.backward()
    opt.step()
    assert not module.teacher.training
    assert all(torch.equal(before_t[k], v) for k, v in module.teacher.state_dict().items())
    assert any(not torch.equal(before_s[k], v) for k, v in module.student.state_dict().items())


def test_wrong_architecture_checkpoint_is_refused(pipeline, tmp_path):
    _, run_dir, _ = pipeline[("distill", "ours")]
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    cfg = _compose("finetune", TINY + [f"init={ckpt}", "model.timm_kwargs.embed_dim=48"], tmp_path)
    with pytest.raises(UserError, match="does not fit model"):
        cli.run_finetune(cfg, tmp_path / "run")


@pytest.mark.slow
def test_console_script_writes_run_folder(tmp_path):
    env = {**os.environ, "DISTORTKD_RUNS": str(tmp_path), "CI": "1"}
    exe = Path(sys.executable).parent / "distortkd-distill"
    proc = subprocess.run([str(exe), *TINY, "trainer.max_epochs=1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = list((tmp_path / "test" / "distill").iterdir())
    assert {"config.yaml", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "csv" / "metrics.csv").is_file()
    bad = subprocess.run([str(exe), *TINY, "distortion.params.sigma=-2"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: noise sigma -2")


def test_heldout_suite_cells_follow_the_model_channels(monkeypatch):
    from distortkd.evaluation import grid_cells

    monkeypatch.delenv("DISTORTKD_FROST_DIR", raising=False)  # 19 corruptions, frost needs photos
    rgb = grid_cells(_compose("evaluate", ["suite=heldout"]))
    grey = grid_cells(_compose("evaluate", ["suite=heldout", "model=demo_vit"]))
    assert len(rgb) == 90 and {s for _, s, _ in rgb} == {1, 2, 3, 4, 5}
    assert len(grey) == 85 and "saturate" not in {n for n, _, _ in grey}


def test_contrastive_inversion_distill_on_a_cnn(tmp_path):
    """The CI baseline's real config (CLIP RN101, random init): projection head kept, InfoNCE."""
    cfg = _compose("distill", TINY + ["model=clip_rn101", "model.pretrained=false", "model.img_size=32",
                                      "loss=contrastive", "method=ci", "data.limit_train=32",
                                      "data.limit_eval=16"], tmp_path)
    metrics = cli.run_distill(cfg, tmp_path / "run")
    assert {"val/loss", "val/loss/nce", "val/cos_clean", "val/cos_clean_baseline"} <= set(metrics)
    assert "val/attn_kl" not in metrics
