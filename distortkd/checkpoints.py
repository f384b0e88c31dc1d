"""Reading checkpoint files that may come from elsewhere: never runs their code, one-line errors.

A ``.ckpt``/``.pth`` is a pickle, and unpickling can call any Python function. Our own checkpoints
hold only tensors and plain containers (the trainer stores OmegaConf nodes as dicts and lists), so
they load with ``torch.load(weights_only=True)``, which refuses everything else. A file that needs
full unpickling is loaded only when the user says they trust it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from distortkd.errors import UserError

TRUST_SWITCH = "trust_checkpoint=true (distortkd-export/-embed: --trust-checkpoint)"


def load_checkpoint(path: str | Path, *, trust: bool = False, mmap: bool = False) -> dict:
    """The checkpoint dict in ``path``, its ``state_dict`` a non-empty ``{name: Tensor}``.

    Args:
        path: a Lightning ``.ckpt``, a ``.pth``/``.bin`` state dict, or a ``.safetensors`` file; a
            bare state dict (of a timm backbone, say) comes back as ``{"state_dict": it}``.
        trust: unpickle fully (``weights_only=False``): the file may run code while loading.
        mmap: map the tensors instead of reading them (zip-format files only).

    Raises:
        UserError: missing, empty or damaged file, a file that needs full unpickling without
            ``trust``, or one that holds no state dict; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        return {"state_dict": _checked_state(_load_safetensors(path), path)}
    ckpt = _torch_load(path, trust, mmap)
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if "state_dict" not in ckpt and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"state_dict": ckpt}
    if "state_dict" not in ckpt:
        keys = ", ".join(map(str, list(ckpt)[:6])) or "none"
        raise UserError(f"checkpoint {str(path)!r} has no state_dict (keys: {keys}); "
                        "expected a distortkd .ckpt or a state dict of tensors")
    ckpt["state_dict"] = _checked_state(ckpt["state_dict"], path)
    return ckpt


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise UserError(f"checkpoint {str(path)!r} is not a readable safetensors file ({err})") from None


def _torch_load(path: Path, trust: bool, mmap: bool) -> object:
    zipped = zipfile.is_zipfile(path)  # torch.save's format since 1.6; finds the archive's end record
    with path.open("rb") as f:
        head = f.read(4)
    if not zipped and head == b"PK\x03\x04":
        # A zip without its end record was cut off; torch's reader reports wherever it tripped.
        raise UserError(f"checkpoint {str(path)!r} is truncated ({path.stat().st_size} bytes, "
                        "its zip archive has no end): an interrupted save or copy?")
    try:  # mmap reads zip archives only; older (legacy) files are read whole
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap and zipped)
    # Damage surfaces as whatever layer trips first (zip reader: RuntimeError; pickle:
    # UnpicklingError, EOFError, ValueError; a trusted file's own code: anything), so catch all.
    except Exception as err:
        raise UserError(_load_failure(path, err)) from None


def _load_failure(path: Path, err: Exception) -> str:
    """One line on why ``torch.load`` failed: damage, or Python objects refused without trust."""
    text = str(err)
    if "Weights only load failed" in text:
        reason = _first_sentence(text.partition("WeightsUnpickler error:")[2] or text)
        if "Unsupported global" in reason:
            return (f"checkpoint {str(path)!r} holds Python objects, and unpickling them can run code "
                    f"({reason}); refused. Only if you trust where it came from: {TRUST_SWITCH}")
        return (f"checkpoint {str(path)!r} is damaged or not a weights-only checkpoint ({reason}); "
                f"if you trust where it came from: {TRUST_SWITCH}")
    reason = _first_sentence(text) or type(err).__name__
    return f"checkpoint {str(path)!r} is damaged or not a torch checkpoint ({reason})"


def _first_sentence(text: str) -> str:
    """torch's messages run to paragraphs; the first sentence of the first non-empty line says it.

    Drops the C++ ``[enforce fail at file.cc:N] .`` prefix of the zip reader's errors.
    """
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    if line.startswith("[enforce fail"):
        line = line.partition("] ")[2].lstrip(". ")
    return line.split(". ")[0].rstrip(".")


def _checked_state(state: object, path: Path) -> dict:
    if not isinstance(state, dict) or len(state) == 0:
        what = "empty" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise UserError(f"checkpoint {str(path)!r}: state_dict is {what}, expected tensors by name")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"checkpoint {str(path)!r}: state_dict entry {bad!r} is a "
                        f"{type(state[bad]).__name__}, expected a tensor")
    return state
