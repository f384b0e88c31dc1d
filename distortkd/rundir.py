"""The run folder as a contract: what its files mean, shared by the CLIs, later stages and the report.

A run folder ``runs/<experiment>/<task>/<run name>/`` holds:

- ``config.yaml``: the resolved config the run was started with (plus ``provenance``: which
  upstream checkpoint it used);
- ``metrics.json``: standard JSON (never NaN/inf) with ``status`` and, for ``ok``, every metric the
  run promises, each finite; a copy of the resolved config under ``config`` so that the run can be
  rebuilt and reported even if ``config.yaml`` is lost;
- ``checkpoints/{best,last}.ckpt``, ``csv/metrics.csv``, and ``error.log`` for a failed run.

``status``: ``ok`` (finished: every promised metric stored and finite), ``failed`` (with ``error``),
``stopped`` (a signal ended it; re-running the command resumes it). A folder with no metrics.json
holds an unfinished run (running, or killed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from omegaconf import OmegaConf

from distortkd.errors import UserError

STATUSES = ("ok", "failed", "stopped")

# Settings that change how a run executes, not what it computes: they may differ on a resume and
# between the seeds of one table cell.
EXECUTION_ONLY = ("resume", "paths.", "logger.", "checkpoint.", "data.num_workers", "data.pin_memory",
                  "data.cache_dir", "threads", "memo_mib", "callbacks.", "provenance.", "allow_unfinished",
                  "trust_checkpoint")
# Names and paths derived from other settings (they carry the seed): never compared.
DERIVED = ("run_name", "names.", "pretrain.run_dir", "finetune_run", "optimize_metric")


def flat(tree, prefix: str = "") -> dict:
    """A nested dict as ``{"a.b.c": leaf}`` (an empty dict or list is a leaf)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out = {}
    for key, sub in tree.items():
        out.update(flat(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def compared(config: dict, *, seed: bool = True) -> dict:
    """The flat settings that define what a run computes (``seed`` dropped with ``seed=False``)."""
    skip = EXECUTION_ONLY + DERIVED
    return {k: v for k, v in flat(config).items()
            if not (k.startswith(skip) or f"{k}." in skip) and (seed or k != "seed")}


def _rooted(config: dict, *, seed: bool = True) -> dict:
    """``compared(config, seed=seed)`` with each path under the config's own run root
    (``paths.root``) written as ``<runs>/…``: a run root moved or copied elsewhere still holds the
    same settings. Only whole leading path components match (``/runs-old`` is not under ``/runs``)."""
    root = str((config.get("paths") or {}).get("root") or "").rstrip("/")
    flat_ = compared(config, seed=seed)
    if not root:
        return flat_
    return {k: "<runs>" + v[len(root):] if isinstance(v, str) and (v == root or v.startswith(root + "/")) else v
            for k, v in flat_.items()}


def differences(old: dict, new: dict) -> list[str]:
    """Compared keys whose values differ (keys only one side has are not compared: configs gain
    keys as the code grows; paths under each side's own run root compare relative to it)."""
    a, b = _rooted(old), _rooted(new)
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k])


def finite_json(obj):
    """``obj`` with every non-finite float replaced by None (standard JSON), and the dotted keys
    of those floats."""
    bad: list[str] = []

    def walk(x, path: str):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(path)
            return None
        if isinstance(x, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]
        return x

    return walk(obj, ""), bad


def read_metrics(run_dir: str | Path) -> tuple[dict | None, str | None]:
    """``(metrics, None)``, or ``(None, why)`` when metrics.json is absent, unreadable or not an object."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None, "no metrics.json (unfinished: running, killed, or never started)"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"unreadable metrics.json: {' '.join(str(err).split())}"
    if not isinstance(metrics, dict):
        return None, "metrics.json is not a JSON object"
    return metrics, None


def read_config(run_dir: str | Path) -> tuple[dict | None, str | None]:
    """The run's resolved config: ``config.yaml``, else the copy in ``metrics.json``.

    Returns ``(config, None)`` or ``(None, why)``.
    """
    path = Path(run_dir) / "config.yaml"
    why = "no config.yaml"
    if path.is_file():
        try:  # OmegaConf reads back exactly what OmegaConf.to_yaml wrote (floats like 5e-05)
            config = OmegaConf.to_container(OmegaConf.load(path))
            if isinstance(config, dict):
                return config, None
            why = "config.yaml is not a mapping"
        except Exception as err:  # noqa: BLE001 - any parse error means the same: unreadable
            why = f"unreadable config.yaml: {' '.join(str(err).split())[:200]}"
    metrics, _ = read_metrics(run_dir)
    if metrics is not None and isinstance(metrics.get("config"), dict):
        return metrics["config"], None
    return None, why


def check_folder(run_dir: str | Path, config: dict) -> None:
    """Refuses a run folder whose results a rerun could destroy or misattribute: it holds
    checkpoints or a finished result of other settings, or of settings that cannot be read.

    A folder without results (a run that failed on a bad value, before any checkpoint) never
    blocks the corrected command; ``resume=false`` (callers skip this check) starts over.
    """
    if not holds_results(run_dir):
        return
    old, why = read_config(run_dir)
    if old is None:
        raise UserError(f"{run_dir} holds results but its settings cannot be read ({why}); accepted: "
                        "restore its config.yaml, resume=false to start the run over, or another run name")
    if keys := differences(old, config):
        there, now = flat(old)[keys[0]], flat(config)[keys[0]]
        raise UserError(f"{run_dir} holds a run with other settings ({keys[0]}: {there!r} there, {now!r} "
                        "now); accepted: the same settings, resume=false to start it over, or a run name "
                        "that tells the runs apart")


def checked_upstream(path: Path, allow_unfinished: bool = False) -> dict:
    """What a run records of a checkpoint it builds on: path, SHA-256 and, for a checkpoint in
    another run's folder, that run and its status.

    Raises:
        UserError: the checkpoint belongs to a run that did not finish (metrics.json status not
            ok, or none), unless ``allow_unfinished`` (then a warning on stderr).
    """
    stat = path.stat()
    record = {"path": str(path.resolve()), "sha256": sha256(path), "size": stat.st_size,
              "mtime_ns": stat.st_mtime_ns}
    run = path.parent.parent if path.parent.name == "checkpoints" else None
    if run is None or not ((run / "config.yaml").is_file() or (run / "metrics.json").is_file()):
        return record  # a file from elsewhere: nothing to check it against
    metrics, why = read_metrics(run)
    status = metrics.get("status") if metrics else None
    record.update(run=str(run.resolve()), run_status=status or "unfinished")
    if status != "ok":
        reason = why if metrics is None else f"status {status}: {metrics.get('error', '')}".rstrip(": ")
        if not allow_unfinished:
            raise UserError(f"{path} belongs to an unfinished run ({reason}); finish it by re-running its "
                            "command, or pass allow_unfinished=true to use it anyway (recorded in config.yaml)")
        print(f"warning: using {path} of an unfinished run ({reason}): allow_unfinished=true", file=sys.stderr)
    return record


def stale(config: dict, run_dir: Path, _seen: frozenset = frozenset()) -> str | None:
    """Why a finished run's results no longer follow from what it was built on: a checkpoint its
    ``provenance`` recorded (path and SHA-256) that holds other bytes now (a teacher, student or
    fine-tune made again in the same place), or whose own run is stale (an evaluation of a
    fine-tune whose student was distilled again). None when every recorded checkpoint is
    unchanged, or gone (a deleted file changes nothing that was computed; made again, it is
    compared then).

    A checkpoint recorded under another run's folder is looked for at its recorded path, then at the
    same place under this run's own root (a run root moved or copied as a whole). The SHA-256 is
    recomputed only when the file's size or modification time differs from the record (records
    without them, older than this check, are always hashed; once per file and version per process).
    """
    recorded = config.get("provenance")
    for what, record in (recorded if isinstance(recorded, dict) else {}).items():
        if not (isinstance(record, dict) and record.get("path") and record.get("sha256")):
            continue
        path = _located(record, run_dir)
        if path is None:
            continue
        stat = path.stat()
        if (record.get("size"), record.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
            now = _sha256_cached(path, stat)
            if now != record["sha256"]:
                return (f"built on {path} (provenance.{what}), which has changed since: sha256 "
                        f"{record['sha256'][:12]} then, {now[:12]} now")
        upstream = path.parent.parent.resolve() if path.parent.name == "checkpoints" else None
        if upstream is not None and upstream not in _seen and (up := read_config(upstream)[0]):
            if (why := stale(up, upstream, _seen | {upstream})) is not None:
                return f"built on {path} (provenance.{what}) of a stale run: {why}"
    return None


def _located(record: dict, run_dir: Path) -> Path | None:
    """The recorded checkpoint's file now: at its path, or under this run's root (moved root)."""
    path = Path(record["path"])
    if path.is_file():
        return path
    if not record.get("run"):
        return None
    try:  # <root>/<experiment>/<task>/<run>: the recorded run's root, and this run's
        moved = Path(run_dir).resolve().parents[2] / path.relative_to(Path(record["run"]).parents[2])
    except (ValueError, IndexError):
        return None
    return moved if moved.is_file() else None


_SHAS: dict[tuple, str] = {}


def _sha256_cached(path: Path, stat: os.stat_result) -> str:
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHAS:
        _SHAS[key] = sha256(path)
    return _SHAS[key]


def check_writable(folder: str | Path, what: str = "run folder",
                   accepted: str = "a writable run root (paths.root=… or DISTORTKD_RUNS=…)") -> None:
    """``folder`` can be created and written: tried before any computation (``os.access`` says
    yes to root whatever the mount says)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"cannot write {what} {folder}: {err.strerror or err}; accepted: {accepted}") from None


def sha256(path: str | Path) -> str:
    """The file's SHA-256 (hex), read in 1 MiB blocks (checkpoints can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def holds_results(run_dir: str | Path) -> bool:
    """Whether the folder holds anything a rerun could destroy: checkpoints or a finished result."""
    run_dir = Path(run_dir)
    if any((run_dir / "checkpoints").glob("*.ckpt")) or any(run_dir.glob("hpc_ckpt_*.ckpt")):
        return True
    metrics, _ = read_metrics(run_dir)
    return metrics is not None and metrics.get("status") == "ok"


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Writes ``path`` atomically: a temp file in the same folder, fsync, then rename.

    Never a half file, even when killed mid-write. The file gets the permissions a plain ``open``
    would give it (``0o666 & ~umask``): ``mkstemp`` makes it 0600, which hides a shared run root's
    results and checkpoints from teammates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def write_json(path: str | Path, obj: dict) -> None:
    """Standard JSON only (``allow_nan=False``): callers replace non-finite floats first."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=float)
    write_text(path, text)


class RunLock:
    """An exclusive lock on a run folder (``.lock``, ``flock``): two identical commands never
    train into one folder. The kernel drops the lock when the holder dies, so a killed run leaves
    no stale lock; the file keeps who holds it, for the message.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 500).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"run folder {self.path.parent} is in use by {holder}; wait for it to "
                            "finish, or stop it and re-run this command to resume") from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def setting(config: dict) -> dict:
    """What a run computes apart from its seed: the settings that decide which runs may pool.

    :func:`compared` without ``seed``, and also without what the seed leaks into: ``*.seed``
    copies of it (``data.seed: ${seed}``) and run names in paths (``…_s3/checkpoints``). Paths
    under the run root are written relative to it, so two run roots can hold the same setting.
    """
    seed = config.get("seed")
    seed_name = re.compile(rf"_s{re.escape(str(seed))}(?=[/_.]|$)")
    out = {}
    for key, value in _rooted(config, seed=False).items():
        if key.endswith(".seed") and value == seed:
            continue
        out[key] = seed_name.sub("_s<seed>", value) if isinstance(value, str) else value
    return out
