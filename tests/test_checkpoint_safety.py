"""Checkpoints from elsewhere: loading never runs their code unless trusted, and a damaged file is
one line naming it, from every loader (init, evaluate, export, embed, the failed run's message)."""

import pathlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from distortkd import build, cli, distortions, embed, evaluation, export
from distortkd.checkpoints import load_checkpoint
from distortkd.errors import UserError
from distortkd.modules import FinetuneModule, load_encoder_weights

CONF = Path(cli.CONF)
MODEL = OmegaConf.load(CONF / "model" / "vit_tiny_test.yaml")
CLASSES = 3


class Payload:
    """Unpickling this creates ``marker``: a stand-in for any code a crafted checkpoint runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _encoder():
    torch.manual_seed(0)
    return build.build_model(MODEL, pretrained=False)


def _student_state() -> dict:
    return {"student.backbone." + k: v for k, v in _encoder().backbone.state_dict().items()}


def _finetuned_state() -> dict:
    module = FinetuneModule(_encoder(), CLASSES, distortions.build("identity"), optimizer=None)
    return module.state_dict()


def _run_folder(root: Path) -> Path:
    """A distill run folder (config.yaml beside checkpoints/) as export and embed expect it."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"task": "distill", "method": "ours", "model": MODEL, "data": {"name": "resisc45"},
           "distortion": {"name": "clean", "family": "identity", "params": {}}, "loss": None}
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    (run / "metrics.json").write_text('{"status": "ok"}')  # a finished run: export refuses others
    return run


def _images(root: Path) -> Path:
    folder = root / "images"
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "a.png")
    return folder


# Each loader as ``(path, trust) -> None``, raising ``UserError`` (the CLIs: exit 2, one line).
def _init(path: Path, trust: bool) -> None:
    load_encoder_weights(_encoder(), path, trust=trust)


def _evaluate(path: Path, trust: bool) -> None:
    cfg = OmegaConf.create({"model": MODEL, "finetune": {"mode": "full"}, "trust_checkpoint": trust})
    evaluation.load_finetuned(cfg, build.build_model, CLASSES, path)


def _main(entry, args: list, trust: bool, capsys) -> None:
    capsys.readouterr()
    code = entry.main([*map(str, args), *(["--trust-checkpoint"] if trust else [])])
    err = capsys.readouterr().err.strip()
    if code == 2:
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        raise UserError(err.partition(": error: ")[2])
    assert code == 0, err


LOADERS = {
    "init": lambda path, trust, capsys: _init(path, trust),
    "evaluate": lambda path, trust, capsys: _evaluate(path, trust),
    "export": lambda path, trust, capsys: _main(export, [path, path.parent.parent / "out"], trust, capsys),
    "embed": lambda path, trust, capsys: _main(
        embed, [path, _images(path.parent.parent), path.parent.parent / "emb.npy", "--workers", "0"],
        trust, capsys),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_checkpoint_that_runs_code_is_refused_unless_trusted(loader, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    state = _finetuned_state() if loader == "evaluate" else _student_state()
    ckpt = _run_folder(tmp_path) / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": state, "extra": Payload(marker)}, ckpt)

    with pytest.raises(UserError) as refused:
        LOADERS[loader](ckpt, False, capsys)
    message = str(refused.value)
    assert not marker.exists(), "the checkpoint's code ran although it was refused"
    assert str(ckpt) in message and "can run code" in message and "\n" not in message
    assert "trust_checkpoint=true" in message and "--trust-checkpoint" in message

    LOADERS[loader](ckpt, True, capsys)  # trusted: unpickled in full, so its code does run
    assert marker.exists()


# Each kind of damage as ``(file name, write(path), what the message must say)``.
def _truncated(path: Path) -> None:
    torch.save({"state_dict": _student_state()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zip_not_torch(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")


def _corrupt_safetensors(path: Path) -> None:
    save_file({k: v.contiguous() for k, v in _encoder().backbone.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:-100])


DAMAGE = {
    "truncated": ("last.ckpt", _truncated, "is truncated"),
    "empty": ("last.ckpt", lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "random_bytes": ("last.ckpt", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "is damaged"),
    "zip_not_torch": ("last.ckpt", _zip_not_torch, "not a torch checkpoint"),
    "corrupt_safetensors": ("model.safetensors", _corrupt_safetensors, "not a readable safetensors file"),
    "no_state_dict": ("last.ckpt", lambda p: torch.save({"epoch": 3, "global_step": 9}, p),
                      "has no state_dict (keys: epoch, global_step)"),
}


def _failed_run_message(path: Path, trust: bool, capsys) -> None:
    """``cli._with_checkpoint`` appends the reason instead of raising: the run's failure comes first."""
    message = cli._with_checkpoint("loss is nan at global step 9", path.parent.parent)
    assert message.startswith("loss is nan at global step 9; no usable checkpoint: ")
    raise UserError(message)


# The failed run's message reads the trainer's last.ckpt: never a .safetensors file.
CASES = [(d, lo) for d in DAMAGE for lo in [*LOADERS, "failed_run"]
         if lo != "failed_run" or DAMAGE[d][0] == "last.ckpt"]


@pytest.mark.parametrize(("damage", "loader"), CASES)
def test_damaged_checkpoint_is_one_line_naming_file_and_fault(damage, loader, tmp_path, capsys):
    name, write, needle = DAMAGE[damage]
    path = _run_folder(tmp_path) / "checkpoints" / name
    write(path)
    with pytest.raises(UserError) as err:
        (LOADERS.get(loader) or _failed_run_message)(path, False, capsys)
    message = str(err.value)
    assert str(path) in message and needle in message and "\n" not in message, message


def test_own_checkpoints_load_without_trust_and_bare_state_dicts_are_wrapped(tmp_path):
    state = _student_state()
    torch.save({"state_dict": state, "global_step": 4, "hparams": OmegaConf.to_container(
        OmegaConf.create({"scale": [0.08, 1.0]}))}, tmp_path / "a.ckpt")
    torch.save(state, tmp_path / "bare.pth")
    assert load_checkpoint(tmp_path / "a.ckpt")["global_step"] == 4
    assert load_checkpoint(tmp_path / "bare.pth")["state_dict"].keys() == state.keys()
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(UserError, match="holds a list, not a checkpoint dict"):
        load_checkpoint(tmp_path / "list.ckpt")
    torch.save({"state_dict": {"w": [1.0]}}, tmp_path / "odd.ckpt")
    with pytest.raises(UserError, match="state_dict entry 'w' is a list, expected a tensor"):
        load_checkpoint(tmp_path / "odd.ckpt")


def test_finetune_cli_refuses_an_init_checkpoint_that_runs_code(tmp_path, monkeypatch, capsys):
    """Through the real entry point: one ``error:`` line, exit 2, and the payload never ran."""
    from test_cli import TINY
    from test_reliability import _cli

    marker, ckpt = tmp_path / "code_ran", tmp_path / "student.ckpt"
    torch.save({"state_dict": _student_state(), "extra": Payload(marker)}, ckpt)
    monkeypatch.setenv("DISTORTKD_RUNS", str(tmp_path / "runs"))
    code, err = _cli("finetune", [*TINY, f"init={ckpt}"], monkeypatch, capsys)
    assert not marker.exists(), "the init checkpoint's code ran"
    last = (err.strip().splitlines() or [""])[-1]
    assert code == 2 and last.startswith("error: ") and str(ckpt) in last and "trust_checkpoint=true" in last


def test_trust_checkpoint_switch_reaches_the_cli_loaders(tmp_path, monkeypatch, capsys):
    """``trust_checkpoint=true`` is passed through to the init loader: the fine-tune runs."""
    from test_cli import TINY
    from test_reliability import _cli

    marker, ckpt = tmp_path / "code_ran", tmp_path / "student.ckpt"
    torch.save({"state_dict": _student_state(), "extra": Payload(marker)}, ckpt)
    monkeypatch.setenv("DISTORTKD_RUNS", str(tmp_path / "runs"))
    code, err = _cli("finetune", [*TINY, f"init={ckpt}", "trust_checkpoint=true"], monkeypatch, capsys)
    assert code == 0 and marker.exists(), err[-2000:]
