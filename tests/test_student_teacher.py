"""A student smaller than its teacher: other width, heads and patch grid, tiny ViTs on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from distortkd import build, cli, export
from distortkd.distortions import build as build_distortion
from distortkd.errors import UserError
from distortkd.losses import attention_kl, head_averaged_attention_kl, multilevel_loss
from distortkd.modules import DistillModule
from distortkd.steps import distill_loss
from distortkd.vit import Features, FrozenTeacher, ToTeacher, build_encoder, build_vit

STUDENT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 4x4 grid
TEACHER = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)  # 8x8 grid
TINY_RUN = ["experiment=test", "data=fashion_mnist", "data.limit_train=64", "data.limit_eval=64",
            "data.batch_size=16", "data.num_workers=0"]


def _vit(seed: int, **kwargs):
    torch.manual_seed(seed)
    return build_vit("vit_tiny_patch16_224", pretrained=False, **kwargs)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        return compose(config_name="distill", overrides=overrides)


def _paper_multilevel(s: Features, t: Features, alpha, beta, gamma, tau):
    """The multilevel loss as it was written before students could differ from their teacher."""
    log_p_s = F.log_softmax(s.attn.float() / tau, dim=-1)
    log_p_t = F.log_softmax(t.attn.float() / tau, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1).mean()
    cls, patch = F.mse_loss(s.cls.float(), t.cls.float()), F.mse_loss(s.patches.float(), t.patches.float())
    return alpha * cls + beta * patch + gamma * kl


def test_same_teacher_builds_what_it_built_before():
    """teacher=same: the student's model config, built twice in the same order, start weights copied."""
    cfg = _compose(["experiment=test"])
    assert cfg.teacher.same
    torch.manual_seed(0)
    old_student, old_teacher = (build.build_model(cfg.model) for _ in range(2))
    old_teacher.load_state_dict(old_student.state_dict())
    torch.manual_seed(0)
    student = build.build_model(cfg.model)
    teacher = build.build_teacher(cfg.teacher, cfg.model, student)
    assert teacher is not student
    for new, old in ((student, old_student), (teacher, old_teacher)):
        a, b = new.state_dict(), old.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in teacher.state_dict().items())


def test_other_teacher_is_built_from_its_own_config():
    cfg = _compose(["experiment=test", "teacher=vit_tiny_test_wide"])
    student = build.build_model(cfg.model)
    teacher = build.build_teacher(cfg.teacher, cfg.model, student)
    assert (student.embed_dim, teacher.embed_dim) == (32, 48)
    assert (student.grid, teacher.grid, student.num_heads, teacher.num_heads) == ((4, 4), (8, 8), 2, 3)


def test_same_architecture_loss_is_bit_equal_to_the_paper_loss():
    student, teacher = _vit(0, **STUDENT), FrozenTeacher(_vit(1, **STUDENT))
    to_teacher = ToTeacher.between(student, teacher.encoder)
    images, seeds = torch.rand(4, 3, 32, 32), torch.arange(4)
    params = dict(alpha=1.0, beta=0.5, gamma=10.0, tau=2.0)
    out = distill_loss(student, teacher, build_distortion("noise_strong"), lambda s, t: multilevel_loss(s, t, **params),
                       images, seeds, to_teacher=to_teacher)
    s = student.features(build_distortion("noise_strong")(images, seeds))
    assert torch.equal(out["loss"], _paper_multilevel(s, teacher.features(images), **params))


def test_head_averaged_attention_kl_by_hand():
    """Different head counts: KL between the head-averaged softmax distributions, summed over patches."""
    torch.manual_seed(0)
    s, t, tau = torch.randn(3, 2, 10), torch.randn(3, 3, 10), 1.5
    expected = 0.0
    for b in range(3):
        p_s = sum(torch.softmax(s[b, h] / tau, -1) for h in range(2)) / 2
        p_t = sum(torch.softmax(t[b, h] / tau, -1) for h in range(3)) / 3
        expected += float((p_t * (p_t.log() - p_s.log())).sum()) / 3
    assert head_averaged_attention_kl(s, t, tau).item() == pytest.approx(expected, rel=1e-5)
    assert attention_kl(s, t, tau).item() == pytest.approx(expected, rel=1e-5)
    same = torch.randn(3, 3, 10)  # equal head counts keep per-head KL, which differs from the averaged one
    assert attention_kl(same, t, tau).item() != pytest.approx(head_averaged_attention_kl(same, t, tau).item())


def test_smaller_student_learns_and_only_it_learns():
    """Other width, heads and grid: finite loss that SGD lowers; gradients reach the student and the
    projection, never the teacher."""
    student, teacher = _vit(0, **STUDENT), FrozenTeacher(_vit(1, **TEACHER))
    to_teacher = ToTeacher.between(student, teacher.encoder)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distortion, images, seeds = build_distortion("noise_strong"), torch.rand(8, 3, 32, 32), torch.arange(8)
    opt = torch.optim.SGD([*student.parameters(), *to_teacher.parameters()], lr=0.1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        out = distill_loss(student, teacher, distortion, multilevel_loss, images, seeds, to_teacher=to_teacher)
        assert all(torch.isfinite(v) for v in out.values()) and out["loss/attn"] > 0
        out["loss"].backward()
        losses.append(out["loss"].item())
        if len(losses) == 1:
            assert to_teacher.proj.weight.grad.abs().sum() > 0
            assert student.backbone.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0  # the attention term
            assert all(p.grad is None for p in teacher.parameters())
        opt.step()
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_distill_module_trains_the_projection_and_saves_no_teacher():
    student, teacher = _vit(0, **STUDENT), _vit(1, **TEACHER)
    module = DistillModule(student, teacher, build_distortion("noise_strong"), multilevel_loss,
                           optimizer=torch.optim.SGD)
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert {"to_teacher.proj.weight", "to_teacher.proj.bias"} <= trained
    assert not any(n.startswith("teacher.") for n in trained)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert "to_teacher.proj.weight" in ckpt["state_dict"]  # resuming needs it
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])


def test_bad_pairs_are_one_line_errors():
    cfg = _compose(["experiment=test"])
    vit = _vit(0, **STUDENT)
    cnn = build_encoder("test_resnet", pretrained=False)
    with pytest.raises(UserError, match="'test_resnet' is not a ViT; accepted") as err:
        build.check_teacher(vit, cnn, cfg.loss, "test_resnet")
    assert "\n" not in str(err.value)
    build.check_teacher(vit, cnn, _compose(["experiment=test", "loss=global"]).loss, "test_resnet")  # CLS only
    grey = build_vit("vit_tiny_patch16_224", pretrained=False, in_chans=1, **TEACHER)
    with pytest.raises(UserError, match="takes 1-channel images, the student 3; accepted: a teacher with in_chans=3"):
        build.check_teacher(vit, grey, cfg.loss, "grey")
    wide = _vit(1, **TEACHER)
    with pytest.raises(UserError, match="loss=contrastive compares embeddings of equal width"):
        build.check_teacher(vit, wide, _compose(["experiment=test", "loss=contrastive"]).loss, "wide")


def test_cli_run_with_a_smaller_student_and_its_export(tmp_path):
    """A real ``distortkd-distill`` run: ViT 32-wide/2 heads/patch 8 from a 48-wide/3 heads/patch 4
    teacher; the checkpoint holds no teacher, the export no projection and loads into plain timm."""
    env = {**os.environ, "DISTORTKD_RUNS": str(tmp_path), "CI": "1"}
    exe = Path(sys.executable).parent / "distortkd-distill"
    proc = subprocess.run([str(exe), *TINY_RUN, "teacher=vit_tiny_test_wide", "logger.attention_every_n_epochs=1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = list((tmp_path / "test" / "distill").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["config"]["teacher"]["timm_kwargs"]["embed_dim"] == 48
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert "to_teacher.proj.weight" in state and not any(k.startswith("teacher.") for k in state)
    folder = export.export(run, tmp_path / "export")
    weights = load_file(str(folder / "model.safetensors"))
    assert not any("to_teacher" in k for k in weights)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **STUDENT)
    plain.load_state_dict(weights)  # strict: exactly the student's backbone
    expected = {k[len("student.backbone."):]: v for k, v in state.items() if k.startswith("student.backbone.")}
    assert all(torch.equal(weights[k], expected[k]) for k in expected) and weights.keys() == expected.keys()
