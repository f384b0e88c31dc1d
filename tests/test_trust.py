"""A result is a contract: never lost, never built on an unfinished run, never ok when it is not.

Each test here fails without the mechanism it names (run-folder contract in ``distortkd.rundir``,
the life of a run in ``distortkd.cli._main``, config checks in ``distortkd.checks``).
"""

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from test_cli import TINY
from test_reliability import BIN, _cli, _env, _run_folder

from distortkd import cli, rundir, training


def _json(path: Path) -> dict:
    """metrics.json read as strict JSON: NaN or Infinity in it is an error."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTORTKD_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def _distill(monkeypatch, capsys, *extra):
    code, err = _cli("distill", [*TINY, *extra], monkeypatch, capsys)
    assert code == 0, err[-2000:]


# ------------------------------------------------------------------ 1. recovery recomputes every metric


@pytest.mark.parametrize("task", ["distill", "finetune"])
def test_a_lost_metrics_json_is_recomputed_whole(task, runs, monkeypatch, capsys):
    """Rerunning a finished run whose metrics.json is gone (deleted, or killed during its final
    test pass) resumes from the final checkpoint, which trains and validates nothing: the metrics
    must still be the full set, equal to the first run's, not ``{best/...: x, status: ok}``."""
    args = ["method=supervised"] if task == "finetune" else []
    code, err = _cli(task, [*TINY, *args], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    run = _run_folder(runs, task)
    first = _json(run / "metrics.json")
    (run / "metrics.json").unlink()
    code, err = _cli(task, [*TINY, *args], monkeypatch, capsys)
    assert code == 0 and "resuming from" in err, err[-2000:]
    again = _json(run / "metrics.json")
    assert again == first and again["status"] == "ok"
    assert set(cli.promised(_compose_for(task, args))) <= again.keys()


def _compose_for(task, args):
    from test_cli import _compose

    return _compose(task, [*TINY, *args])


def test_non_finite_metric_fails_the_run_and_json_stays_standard(runs, monkeypatch, capsys):
    real = cli._metrics
    monkeypatch.setattr(cli, "_metrics", lambda trainer: {**real(trainer), "val/cos_clean": float("nan")})
    code, err = _cli("distill", TINY, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "non-finite val/cos_clean" in last, err[-2000:]
    metrics = _json(_run_folder(runs) / "metrics.json")
    assert metrics["status"] == "failed" and "val/cos_clean" in metrics["error"]


def test_a_missing_promised_metric_fails_the_run(runs, monkeypatch, capsys):
    real = cli._metrics
    monkeypatch.setattr(cli, "_metrics", lambda trainer: {k: v for k, v in real(trainer).items() if k != "val/loss"})
    code, err = _cli("distill", TINY, monkeypatch, capsys)
    assert code == 2 and "missing val/loss" in err.strip().splitlines()[-1]
    assert _json(_run_folder(runs) / "metrics.json")["status"] == "failed"


# ------------------------------------------------------------------ 2. later stages and unfinished runs


def test_finetune_refuses_an_unfinished_student_unless_allowed(runs, monkeypatch, capsys):
    _distill(monkeypatch, capsys)
    student = _run_folder(runs)
    (student / "metrics.json").unlink()  # as after a kill: checkpoints, no result
    code, err = _cli("finetune", [*TINY, "method=ours"], monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "unfinished run" in last and "allow_unfinished=true" in last, err[-2000:]
    refused = _run_folder(runs, "finetune")
    assert not (refused / "checkpoints").exists()
    assert "unfinished run" in _json(refused / "metrics.json")["error"]

    code, err = _cli("finetune", [*TINY, "method=ours", "allow_unfinished=true"], monkeypatch, capsys)
    assert code == 0 and "warning: using" in err, err[-2000:]
    config, _ = rundir.read_config(_run_folder(runs, "finetune"))
    init = config["provenance"]["init"]
    assert init["run_status"] == "unfinished" and config["allow_unfinished"] is True
    assert init["sha256"] == rundir.sha256(init["path"]) and Path(init["path"]).parent.parent == student


def test_finetune_records_the_finished_student_it_used(runs, monkeypatch, capsys):
    _distill(monkeypatch, capsys)
    code, err = _cli("finetune", [*TINY, "method=ours"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    init = rundir.read_config(_run_folder(runs, "finetune"))[0]["provenance"]["init"]
    assert init["run_status"] == "ok" and init["path"].endswith("checkpoints/best.ckpt")
    assert init["sha256"] == rundir.sha256(init["path"])


def test_finetune_records_which_weights_it_tested(runs, monkeypatch, capsys):
    for test_ckpt, expect in (("last", "final weights (global step "), ("best", "checkpoints/best.ckpt")):
        monkeypatch.setenv("DISTORTKD_RUNS", str(runs / test_ckpt))
        code, err = _cli("finetune", [*TINY, "method=supervised", f"finetune.test_ckpt={test_ckpt}"],
                         monkeypatch, capsys)
        assert code == 0, err[-2000:]
        run = _run_folder(runs / test_ckpt, "finetune")
        assert expect in _json(run / "metrics.json")["test_checkpoint"]


def test_evaluate_refuses_an_unfinished_finetune(runs, monkeypatch, capsys):
    code, err = _cli("finetune", [*TINY, "method=supervised"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    finetuned = _run_folder(runs, "finetune")
    metrics = _json(finetuned / "metrics.json")
    (finetuned / "metrics.json").write_text(json.dumps({**metrics, "status": "stopped", "error": "SIGTERM"}))
    code, err = _cli("evaluate", [*TINY, "method=supervised"], monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "unfinished run (status stopped: SIGTERM)" in last, err[-2000:]


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    """A SIGTERM mid-epoch: last.ckpt saved at that step, status stopped, exit 143; the same command
    again resumes and ends bit-identical to a run that was never stopped."""
    args = [*TINY, "data.limit_train=96", "data.limit_eval=32", "trainer.max_epochs=2", "seed=3",
            "trainer.deterministic=true"]  # 6 steps per epoch, no step checkpoints: only the SIGTERM one
    exe = str(BIN / "distortkd-distill")
    term = ["+callbacks.term._target_=faults.SignalAtStep", "+callbacks.term.step=3"]
    stopped = subprocess.run([exe, *args, *term], env=_env(tmp_path / "stopped", tests=True),
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    run = _run_folder(tmp_path / "stopped")
    assert _json(run / "metrics.json")["status"] == "stopped"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    for name in ("stopped", "whole"):
        proc = subprocess.run([exe, *args], env=_env(tmp_path / name), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [_run_folder(tmp_path / name) for name in ("whole", "stopped")]
    metrics = [_json(r / "metrics.json") for r in runs]
    for m in metrics:
        m.pop("config")  # paths.root differs
    assert metrics[0] == metrics[1] and metrics[0]["status"] == "ok"
    weights = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_sweep_whose_jobs_all_failed_exits_1(runs, monkeypatch, capsys):
    code, err = _cli("distill", ["-m", *TINY, "trainer.max_epochs=0,-5"], monkeypatch, capsys)
    assert code == 1 and "all 2 jobs failed" in err.strip().splitlines()[-1], err[-2000:]


def test_export_and_embed_refuse_an_unfinished_run_unless_allowed(runs, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from distortkd import embed, export

    _distill(monkeypatch, capsys)
    run = _run_folder(runs)
    (run / "metrics.json").unlink()
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40)).save(images / "a.png")
    capsys.readouterr()
    for main, args in ((export.main, [run, tmp_path / "export"]), (embed.main, [run, images, tmp_path / "e.npy"])):
        assert main([*map(str, args)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "unfinished run" in last and "allow_unfinished" in last, last
        assert main([*map(str, args), "--allow-unfinished"]) == 0
        assert "warning: using" in capsys.readouterr().err


def test_export_and_embed_check_their_outputs_before_computing(runs, tmp_path, monkeypatch, capsys):
    from distortkd import embed, export

    _distill(monkeypatch, capsys)
    run, taken = _run_folder(runs), tmp_path / "taken"
    taken.write_text("a file")
    loaded = []
    monkeypatch.setattr(export, "rebuild_encoder", lambda *a, **k: loaded.append(1))
    capsys.readouterr()
    assert export.main([str(run), str(taken)]) == 2 and "is an existing file" in capsys.readouterr().err
    assert export.main([str(run), "/proc/distortkd/out"]) == 2 and "cannot write" in capsys.readouterr().err
    assert embed.main([str(run), str(tmp_path), "/proc/distortkd/e.npy"]) == 2
    assert "cannot write output folder /proc/distortkd" in capsys.readouterr().err and not loaded


def test_export_survives_a_corrupt_metrics_json_of_a_finetune(runs, tmp_path, monkeypatch, capsys):
    from distortkd import export

    _distill(monkeypatch, capsys)
    code, err = _cli("finetune", [*TINY, "method=ours"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    (_run_folder(runs, "finetune") / "metrics.json").write_text("{not json")
    assert export.main([str(_run_folder(runs)), str(tmp_path / "out")]) == 0
    assert "Fine-tuned from this student" not in (tmp_path / "out" / "README.md").read_text()


# ------------------------------------------------------------------ 3. a checkpoint made again in place


def _replace(path: Path) -> bytes:
    """Other bytes at ``path`` (as when its run is made again); returns the old ones."""
    old = path.read_bytes()
    path.write_bytes(old + b"\0")
    return old


def test_a_finished_run_built_on_a_replaced_checkpoint_is_refused_and_left_out(runs, monkeypatch, capsys):
    """A student distilled again in its folder: the fine-tune built on the old one keeps its
    folder, but its rerun refuses with one line instead of reporting old numbers as the new
    student's, and the report leaves it out as stale. The old bytes back (a new mtime), it counts
    again."""
    from distortkd.runs import load_runs

    _distill(monkeypatch, capsys)
    code, err = _cli("finetune", [*TINY, "method=ours"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    tuned = _run_folder(runs, "finetune")
    stored = (tuned / "metrics.json").read_text()
    init = Path(rundir.read_config(tuned)[0]["provenance"]["init"]["path"])
    assert load_runs([runs]).set_index("task").loc["finetune", "status"] == "ok"
    old = _replace(init)
    code, err = _cli("finetune", [*TINY, "method=ours"], monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: {tuned} is finished but built on {init}"), err[-2000:]
    assert "(provenance.init), which has changed since" in last and "resume=false" in last
    assert (tuned / "metrics.json").read_text() == stored  # nothing of it is lost
    row = load_runs([runs]).set_index("task").loc["finetune"]
    assert row["status"] == "stale" and "which has changed since" in row["error"]
    init.write_bytes(old)
    code, err = _cli("finetune", [*TINY, "method=ours"], monkeypatch, capsys)
    assert code == 0 and "already finished" in err, err[-2000:]
    assert load_runs([runs]).set_index("task").loc["finetune", "status"] == "ok"


def test_staleness_follows_a_moved_root_and_the_model_weights_file(tmp_path):
    """The check finds a recorded checkpoint under the run's own root after the root moved (and
    only a real change there is stale); a deleted one is not stale; the model's weights file (the
    demo's teacher) is recorded as ``weights`` and checked alike."""
    from test_cli import _compose

    from distortkd import build

    old_root, new_root = tmp_path / "old", tmp_path / "new"
    ckpt = old_root / "test" / "distill" / "student" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"student")
    rundir.write_json(ckpt.parent.parent / "metrics.json", {"status": "ok"})
    record = rundir.checked_upstream(ckpt)
    config = {"provenance": {"init": record}}
    tuned = old_root / "test" / "finetune" / "tuned"
    assert rundir.stale(config, tuned) is None
    old_root.rename(new_root)
    moved, tuned = new_root / "test" / "distill" / "student" / "checkpoints" / "best.ckpt", new_root / "test" / "finetune" / "tuned"
    assert rundir.stale(config, tuned) is None
    _replace(moved)
    assert f"built on {moved} (provenance.init)" in rundir.stale(config, tuned)
    moved.unlink()
    assert rundir.stale(config, tuned) is None

    weights = tmp_path / "teacher.ckpt"
    weights.write_bytes(b"teacher")
    cfg = _compose("distill", [*TINY, f"model.weights_file={weights}"], root=tmp_path / "runs")
    recorded = build.upstream(cfg)
    assert recorded["weights"]["sha256"] == rundir.sha256(weights)
    assert rundir.stale({"provenance": recorded}, tmp_path / "runs" / "test" / "distill" / "x") is None
    _replace(weights)
    assert "(provenance.weights)" in rundir.stale({"provenance": recorded}, tmp_path / "runs" / "test" / "distill" / "x")


def test_an_evaluation_of_a_stale_finetune_is_stale(tmp_path):
    """Staleness passes down: the fine-tune's own checkpoint is unchanged, but it was trained from
    a student distilled again since, so an evaluation of it is stale too; and the study, which
    scores finished fine-tunes itself, skips the stale one."""
    from distortkd import study

    root = tmp_path / "runs" / "test"

    def run(task, name, provenance=None):
        folder = root / task / name
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "best.ckpt").write_bytes(name.encode())
        config = {"task": task, "finetune": {"mode": "full"}, "provenance": provenance or {}}
        rundir.write_text(folder / "config.yaml", json.dumps(config))
        rundir.write_json(folder / "metrics.json", {"status": "ok"})
        return folder, folder / "checkpoints" / "best.ckpt"

    _, student = run("distill", "student")
    tuned, weights = run("finetune", "tuned", {"init": rundir.checked_upstream(student)})
    evaluated = {"provenance": {"checkpoint": rundir.checked_upstream(weights)}}
    assert rundir.stale(evaluated, root / "evaluate" / "x") is None
    assert study.finished(root, "finetune") == [tuned]
    _replace(student)
    why = rundir.stale(evaluated, root / "evaluate" / "x")
    assert why.startswith(f"built on {weights} (provenance.checkpoint) of a stale run: built on {student}")
    assert study.finished(root, "finetune") == []


# ------------------------------------------------------------------ 5. damaged run folders, locks


def test_unreadable_config_of_a_run_with_results_is_refused(runs, monkeypatch, capsys):
    _distill(monkeypatch, capsys)
    run = _run_folder(runs)
    (run / "metrics.json").unlink()
    (run / "config.yaml").write_text("optim: [unclosed\n")
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    code, err = _cli("distill", [*TINY, "optim.optimizer.lr=1e-3"], monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "settings cannot be read" in last and "resume=false" in last, err[-2000:]
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert (run / "config.yaml").read_text() == "optim: [unclosed\n"


def test_deleted_config_of_a_finished_run_is_restored_and_still_guards(runs, monkeypatch, capsys):
    _distill(monkeypatch, capsys)
    run = _run_folder(runs)
    original = (run / "config.yaml").read_text()
    (run / "config.yaml").unlink()
    code, err = _cli("distill", [*TINY, "distortion.params.sigma=0.9"], monkeypatch, capsys)
    assert code == 2 and "distortion.params.sigma: 0.5 there, 0.9 now" in err, err[-2000:]
    code, err = _cli("distill", TINY, monkeypatch, capsys)
    assert code == 0 and "already finished" in err
    assert (run / "config.yaml").is_file()
    assert rundir.differences(rundir.read_config(run)[0], _yaml(original)) == []


def _yaml(text: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(text))


def test_a_run_that_failed_without_results_does_not_block_the_corrected_command(runs, monkeypatch, capsys):
    bad = runs / "test" / "distill" / "fashion_mnist_vittest_noise_strong_multilevel_s0"
    bad.mkdir(parents=True)  # as a failure at run time leaves it: its config and a failed status
    (bad / "config.yaml").write_text("data:\n  path: /wrong\n")
    (bad / "metrics.json").write_text(json.dumps({"status": "failed", "error": "no such folder"}))
    _distill(monkeypatch, capsys)
    assert _json(bad / "metrics.json")["status"] == "ok"


def test_a_second_command_on_a_locked_run_folder_is_refused(runs, monkeypatch, capsys):
    _distill(monkeypatch, capsys)
    run = _run_folder(runs)
    (run / "metrics.json").unlink()
    with rundir.RunLock(run):
        code, err = _cli("distill", TINY, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "is in use by pid" in last and str(os.getpid()) in last, err[-2000:]
    assert not (run / "metrics.json").exists()  # the holder's folder is left alone
    _distill(monkeypatch, capsys)  # released: the same command runs


# ------------------------------------------------------------------ 6. permissions


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_results_and_checkpoints_respect_the_umask(mask, mode, tmp_path):
    old = os.umask(mask)
    try:
        rundir.write_json(tmp_path / "metrics.json", {"status": "ok"})
        training.AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "c" / "last.ckpt")
    finally:
        os.umask(old)
    for path in (tmp_path / "metrics.json", tmp_path / "c" / "last.ckpt"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_cli_run_leaves_files_teammates_can_read(runs, monkeypatch, capsys):
    old = os.umask(0o022)
    try:
        _distill(monkeypatch, capsys)
    finally:
        os.umask(old)
    run = _run_folder(runs)
    for name in ("config.yaml", "metrics.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name


# ------------------------------------------------------------------ 8. every value checked first


@pytest.mark.parametrize(
    "entry,args,needle",
    [
        ("distill", ["loss.params.alpha=0", "loss.params.beta=0", "loss.params.gamma=0"], "all 0"),
        ("distill", ["loss.params.tau=0"], "loss.params.tau=0"),
        ("distill", ["loss=contrastive", "loss.params.tau=-1"], "loss.params.tau=-1"),
        ("distill", ["data.batch_size=0"], "data.batch_size=0"),
        ("distill", ["data.eval_batch_size=-4"], "data.eval_batch_size=-4"),
        ("distill", ["trainer.max_epochs=0"], "trainer.max_epochs=0"),
        ("distill", ["trainer.max_steps=-2"], "trainer.max_steps=-2"),
        ("distill", ["optim.optimizer.lr=0"], "optim.optimizer.lr=0"),
        ("distill", ["optim.optimizer.lr=fast"], "optim.optimizer.lr='fast'"),
        ("distill", ["seed=1.5"], "seed=1.5"),
        ("distill", ["threads=-1"], "threads=-1"),
        ("distill", ["data.num_workers=-1"], "data.num_workers=-1"),
        ("distill", ["optim.warmup=-0.1"], "optim.warmup=-0.1"),
        ("distill", ["method=mine"], "method='mine'"),
        ("finetune", ["finetune.knn_k=0"], "finetune.knn_k=0"),
        ("finetune", ["finetune.mode=probe"], "finetune.mode='probe'"),
        ("finetune", ["finetune.test_ckpt=first"], "finetune.test_ckpt='first'"),
        ("distill", ["model.img_size=30", "model.timm_kwargs.img_size=30"], "not a multiple of"),
        ("distill", ["data.image_size=64"], "input size 32"),
        ("evaluate", ["families=[fog]"], "unknown evaluation family 'fog'"),
        ("evaluate", ["suite=imagenet_c"], "suite='imagenet_c'"),
        ("distill", ["paths.root=/proc/distortkd"], "cannot write run folder /proc/distortkd"),
        ("distill", ["distortion=blur_weak", "distortion.params.kernel_size=4"], "kernel_size"),
        ("distill", ["model.timm_kwargs.depth=0"], "model.timm_kwargs.depth=0"),
        ("distill", ["distortion.params.sigma=nan"], "sigma"),
        ("distill", ["+distortion.params.clip=maybe"], "clip"),
    ],
)
def test_bad_values_are_refused_before_any_work(entry, args, needle, runs, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(cli, "build_model", lambda *a, **k: built.append(1))
    code, err = _cli(entry, [*TINY, *args], monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and needle in last, err[-2000:]
    assert "Traceback" not in err and not built
    written = [p for p in runs.rglob("*") if p.is_file() and ".hydra" not in p.parts]  # Hydra's own copy
    assert written == []


def test_the_stopped_exit_codes_are_the_shells(monkeypatch):
    assert cli._signal_of(training.SIGTERMException()) == "SIGTERM"
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemExit(1) from None  # what Lightning does on Ctrl+C
    except SystemExit as stop:
        assert cli._signal_of(stop) == "SIGINT"
    assert cli._signal_of(SystemExit(2)) is None
    assert cli._STOPPED == {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


def test_a_batch_of_only_undecodable_images_is_skipped_not_fatal(runs, tmp_path, monkeypatch, capsys):
    """Batch size 1 over a folder with a truncated JPEG: that batch is empty; the run finishes."""
    from test_data import corrupt_tree

    root = corrupt_tree(tmp_path)
    bad = root / "val" / "n01749939" / "n01749939_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # one empty batch in validation too
    args = ["experiment=test", "data=imagenet100", f"data.path={root}", "data.batch_size=1",
            "data.max_bad_fraction=0.5", "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}",
            "data.in_memory=false"]
    code, err = _cli("distill", args, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert _json(_run_folder(runs) / "metrics.json")["status"] == "ok"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["data.rrc_scale=[2,1]"], "rrc_scale"),
        (["trainer.precision=17"], "cannot build lightning.pytorch.trainer.trainer.Trainer: Precision 17 is invalid"),
        (["trainer.devices=0"], "devices=0"),
        (["+model.timm_kwargs.foo=1"], "timm cannot build model 'vit_tiny_patch16_224'"),
    ],
)
def test_objects_a_config_node_cannot_build_are_one_line(args, needle, runs, monkeypatch, capsys):
    """The data module, the trainer and the model reject a value with their own message: it
    reaches the user as one line, not as Hydra's wrapped stack trace."""
    code, err = _cli("distill", [*TINY, *args], monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and needle in last and "Traceback" not in err, err[-2000:]


def test_a_moved_run_root_holds_the_same_settings_but_another_upstream_does_not():
    """A path under a run's own root (the demo's teacher checkpoint) compares relative to it, so a
    run folder moved to another root is still recognised; a path to another place is a difference."""
    old = {"paths": {"root": "/tmp/demo-after"}, "seed": 0,
           "demo": {"teacher_ckpt": "/tmp/demo-after/demo/finetune/teacher/checkpoints/last.ckpt"},
           "model": {"weights_file": "/data/dino.safetensors"}}
    moved = {"paths": {"root": "experiments/demo/runs/"}, "seed": 0,
             "demo": {"teacher_ckpt": "experiments/demo/runs/demo/finetune/teacher/checkpoints/last.ckpt"},
             "model": {"weights_file": "/data/dino.safetensors"}}
    assert rundir.differences(old, moved) == []
    other = {**moved, "demo": {"teacher_ckpt": "/elsewhere/demo/finetune/teacher/checkpoints/last.ckpt"}}
    assert rundir.differences(old, other) == ["demo.teacher_ckpt"]
    prefix_only = {**old, "demo": {"teacher_ckpt": "/tmp/demo-after-2/teacher.ckpt"}}  # not under the root
    assert rundir.differences(prefix_only, {**moved, "demo": {"teacher_ckpt": "experiments/demo/runs-2/teacher.ckpt"}}) \
        == ["demo.teacher_ckpt"]


def test_setting_pools_a_moved_root_but_not_a_sibling_folder():
    """``setting`` (which runs may pool) writes paths under the run root relative to it, by whole
    path components: a sibling folder whose name only starts with the root's is another upstream."""
    def cfg(root, ckpt, seed=0):
        return {"paths": {"root": root}, "seed": seed, "demo": {"teacher_ckpt": ckpt}}
    a = rundir.setting(cfg("/r", "/r/demo/finetune/teacher_s0/last.ckpt"))
    assert a == rundir.setting(cfg("/elsewhere/r2", "/elsewhere/r2/demo/finetune/teacher_s1/last.ckpt", seed=1))
    assert a["demo.teacher_ckpt"] == "<runs>/demo/finetune/teacher_s<seed>/last.ckpt"
    assert rundir.setting(cfg("/r", "/r-old/demo/finetune/teacher_s0/last.ckpt"))["demo.teacher_ckpt"] \
        == "/r-old/demo/finetune/teacher_s<seed>/last.ckpt"
