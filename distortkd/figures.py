"""The paper's figures from the report's data frames: accuracy vs severity (Fig. 2), accuracy vs
label fraction (Fig. 3) and CLS→patch attention maps (Fig. 4); the demo's accuracy vs fine-tune
steps.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so they render
headless, leave no global figure state behind and work in any thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

PNG_DPI = 150

# (npz key, column title, npz key of the image the map is drawn over)
ATTENTION_COLUMNS = (
    ("teacher_clean", "teacher on clean", "clean"),
    ("student", "student on distorted", "input"),
    ("baseline", "baseline on distorted", "input"),
)


def panels(n: int, ncols: int = 3, size: tuple[float, float] = (3.8, 3.0)) -> tuple[Figure, list]:
    """A figure with ``n`` subplots on a grid of at most ``ncols`` columns; the rest hidden."""
    ncols = max(1, min(n, ncols))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def save_figure(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PNG_DPI, bbox_inches="tight")
    return path


def _lines(ax, df: pd.DataFrame, x: str, value: str, label: str = "curve") -> None:
    """One line per ``label``: mean over seeds of ``value`` (a fraction, drawn in %) ± std band.

    The caller's labels must keep settings apart (the report's ``curve`` does): runs of one label
    and ``x`` are averaged.
    """
    seed = df["seed"].astype(str).where(df["seed"].notna(), df["path"])
    df = df.assign(_seed=seed)
    for name, group in df.groupby(label, sort=False):
        per_seed = group.groupby([x, "_seed"])[value].mean()
        stats = per_seed.groupby(level=0).agg(["mean", "std"]).sort_index()
        xs = stats.index.to_numpy(dtype=float)
        mean, std = stats["mean"].to_numpy() * 100, stats["std"].fillna(0.0).to_numpy() * 100
        (line,) = ax.plot(xs, mean, marker="o", label=str(name))
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.grid(alpha=0.3)


def severity_figure(
    rows: pd.DataFrame, path: Path, metric: str = "acc1", title: Callable[[str], str] = str
) -> Path | None:
    """Fig. 2: accuracy vs severity, one subplot per distortion, one line per ``curve``.

    Args:
        rows: evaluate rows with columns ``distortion``, ``severity``, ``metric`` (fraction in
            ``[0, 1]``), ``curve`` (line label, one setting), ``seed`` and ``path``.
        path: the PNG to write.
        metric: the accuracy column.
        title: maps a distortion name to its subplot title.

    Returns:
        ``path``, or None when there is nothing to draw.
    """
    rows = rows.dropna(subset=["distortion", "severity", metric])
    if rows.empty:
        return None
    names = list(dict.fromkeys(rows["distortion"]))
    fig, axes = panels(len(names))
    for ax, name in zip(axes, names, strict=True):
        _lines(ax, rows[rows["distortion"].eq(name)], "severity", metric)
        ax.set(title=title(name), xlabel="severity", ylabel="accuracy (%)")
        ax.legend(fontsize="small")  # each panel may hold other models (one student per family)
    return save_figure(fig, path)


def labels_figure(
    runs: pd.DataFrame, path: Path, value: str = "value", title: Callable[[str], str] = str
) -> Path | None:
    """Fig. 3: accuracy vs label fraction (log x axis in %), one subplot per ``distortion.name``.

    Args:
        runs: finished fine-tuning runs with ``data.label_fraction``, ``distortion.name``,
            ``value`` (fraction in ``[0, 1]``), ``curve`` (line label, one setting
            but the label fraction), ``seed`` and ``path``.
        path: the PNG to write.
        value: the accuracy column.
        title: maps a distortion name to its subplot title.

    Returns:
        ``path``, or None when there is nothing to draw.
    """
    runs = runs.dropna(subset=["data.label_fraction", "distortion.name", value])
    if runs.empty:
        return None
    names = list(dict.fromkeys(runs["distortion.name"]))
    fractions = sorted(runs["data.label_fraction"].astype(float).unique())
    fig, axes = panels(len(names))
    for ax, name in zip(axes, names, strict=True):
        _lines(ax, runs[runs["distortion.name"].eq(name)], "data.label_fraction", value)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(fractions))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x * 100:g}%"))
        ax.set(title=title(name), xlabel="labelled fraction", ylabel="accuracy (%)")
    axes[0].legend(fontsize="small")
    return save_figure(fig, path)


def steps_figure(curves: pd.DataFrame, path: Path) -> Path | None:
    """Accuracy vs fine-tune steps: one subplot per (distortion, label fraction), one line per
    method (val accuracy, mean ± std over seeds) and a cross at each run's selected checkpoint
    (its step, its test accuracy).

    Args:
        curves: one row per validation check with ``distortion.name``, ``data.label_fraction``,
            ``steps``, ``val`` and ``value`` (accuracies as fractions), ``selected`` (bool),
            ``curve`` (one line each), ``seed`` and ``path``.
        path: the PNG to write.

    Returns:
        ``path``, or None when there is nothing to draw.
    """
    curves = curves.dropna(subset=["steps", "val"])
    if curves.empty:
        return None
    keys = list(dict.fromkeys(zip(curves["distortion.name"], curves["data.label_fraction"],
                                  strict=True)))
    fig, axes = panels(len(keys), ncols=2)
    for ax, (name, frac) in zip(axes, keys, strict=True):
        part = curves[curves["distortion.name"].eq(name) & curves["data.label_fraction"].eq(frac)]
        _lines(ax, part, "steps", "val")
        for line, (_, group) in zip(ax.get_lines(), part.groupby("curve", sort=False),
                                    strict=True):
            picked = group[group["selected"]]
            ax.plot(picked["steps"], picked["value"] * 100, "x", color=line.get_color(),
                    markersize=9, label=f"{line.get_label()}: test, selected")
        ax.set(title=f"{name}, {frac * 100:g} % labels", xlabel="fine-tune steps (× 128 images)",
               ylabel="accuracy (%)")
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def _image(chw: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``[C, H, W]`` in ``[0, 1]`` → an array imshow takes, and the colormap for one channel."""
    img = np.clip(np.asarray(chw, dtype=np.float32), 0.0, 1.0)
    if img.shape[0] == 1:
        return img[0], "gray"
    return img[:3].transpose(1, 2, 0), None


def _overlay(ax, chw: np.ndarray, attn: np.ndarray | None) -> None:
    """Draws the image and, when given, an attention map ``[gh, gw]`` stretched over it.

    The map is bilinearly upsampled to the image size by imshow's extent; each map is scaled to
    its own maximum because only where the CLS token looks matters, not the absolute mass.
    """
    img, cmap = _image(chw)
    ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0)
    if attn is not None:
        h, w = img.shape[:2]
        attn = attn / max(float(attn.max()), 1e-12)
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        ax.imshow(attn, cmap="inferno", alpha=0.55, extent=extent, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])  # not set_axis_off: the row's ylabel must stay visible
    ax.spines[:].set_visible(False)


def _load_attention(path: Path) -> dict[str, np.ndarray]:
    """Reads ``attention.npz``; images ``[K, C, H, W]``, maps ``[K, heads, gh, gw]``."""
    with np.load(path) as npz:
        arrays = {key: np.asarray(npz[key]) for key in npz.files}
    if "input" not in arrays or arrays["input"].ndim != 4:
        raise ValueError(f"{path} has no 'input' array [K, C, H, W]; keys: {sorted(arrays)}")
    for key, _, _ in ATTENTION_COLUMNS:
        if key in arrays and arrays[key].ndim != 4:
            raise ValueError(f"{path}: {key!r} must be [K, heads, gh, gw]; got {arrays[key].shape}")
    return arrays


def attention_figures(npz: Path, out_dir: Path, max_images: int = 4) -> list[Path]:
    """Fig. 4: ``attention.png`` (head-averaged maps per image) and ``attention_heads.png``.

    ``attention.png`` has one row per image and the columns input (distorted), teacher on clean,
    student on distorted, baseline on distorted (columns whose maps are absent are left out).
    ``attention_heads.png`` shows every head of each model for the first image.

    Raises:
        ValueError: the file lacks ``input`` or an array has the wrong rank.
    """
    arrays = _load_attention(npz)
    cols = [(key, title, bg if bg in arrays else "input")
            for key, title, bg in ATTENTION_COLUMNS if key in arrays]
    k = min(len(arrays["input"]), max_images)
    fig = Figure(figsize=(2.4 * (1 + len(cols)), 2.4 * k), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(k, 1 + len(cols), squeeze=False)
    for j, title in enumerate(["input (distorted)", *(title for _, title, _ in cols)]):
        axes[0, j].set_title(title, fontsize="small")
    for i in range(k):
        _overlay(axes[i, 0], arrays["input"][i], None)
        axes[i, 0].set_ylabel(f"image {i}")
        for j, (key, _, bg) in enumerate(cols, start=1):
            _overlay(axes[i, j], arrays[bg][i], arrays[key][i].mean(0))
    paths = [save_figure(fig, out_dir / "attention.png")]
    if cols:
        paths.append(_heads_figure(arrays, cols, out_dir / "attention_heads.png"))
    return paths


def _heads_figure(arrays: Mapping[str, np.ndarray], cols: list, path: Path) -> Path:
    """One row per model, one column per head, all for the first image."""
    heads = max(arrays[key].shape[1] for key, _, _ in cols)
    fig = Figure(figsize=(2.0 * heads, 2.1 * len(cols)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(cols), heads, squeeze=False)
    for h in range(heads):
        axes[0, h].set_title(f"head {h}", fontsize="small")
    for r, (key, title, bg) in enumerate(cols):
        axes[r, 0].set_ylabel(title, fontsize="small")
        for h in range(heads):
            if h < arrays[key].shape[1]:
                _overlay(axes[r, h], arrays[bg][0], arrays[key][0, h])
            else:
                axes[r, h].set_axis_off()
    return save_figure(fig, path)
