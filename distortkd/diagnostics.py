"""Representation diagnostics: how close the student on distorted images is to the teacher on clean.

Pure torch functions on ``Features`` (CLS ``[B, D]``, patch tokens ``[B, N, D]``, CLS→patch attention
logits ``[B, H, N]``), and ``RepresentationMeter``, which accumulates them over an evaluation set.
Keys are bare (``cos_cls``, ...); callers namespace them (``test/<distortion>/<severity>/cos_cls``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distortkd.errors import UserError
from distortkd.losses import attention_kl
from distortkd.vit import Features

KEYS = ("cos_cls", "cos_patch", "cka_cls", "attn_kl", "attn_iou")


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Mean cosine similarity of matching rows: ``[B, D]`` per sample, ``[B, N, D]`` per token.

    Computed in fp32; returns a 0-dim tensor in ``[-1, 1]`` (1 for identical features).
    """
    if a.shape != b.shape:
        raise UserError(
            f"cosine needs features of one shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean()


def _cka_from_covariances(cross: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    """Linear CKA from centred second moments ``Xcᵀ Yc [d1, d2]``, ``Xcᵀ Xc``, ``Ycᵀ Yc``."""
    return cross.square().sum() / (torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy))


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear centred kernel alignment (Kornblith et al., ICML 2019) of ``x [n, d1]``, ``y [n, d2]``.

    ``‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F)`` with column-centred features, in float64 because the
    squared norms of wide features lose digits in fp32. In ``[0, 1]``; 1 for y = x·Q·s + c (Q
    orthogonal, s > 0); about d/n for independent features, so use n ≫ d (see
    ``RepresentationMeter``). NaN when either input is constant (n < 2).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise UserError(
            f"linear_cka needs [n, d1] and [n, d2]; got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    x, y = x.double(), y.double()
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    return _cka_from_covariances(x.T @ y, x.T @ x, y.T @ y)


def _topk_count(k: int | float, n: int) -> int:
    """``k`` patches: an int in ``[1, N]``, or a float fraction of N in ``(0, 1]`` (at least 1)."""
    if isinstance(k, float) and 0 < k <= 1:
        return max(1, round(k * n))
    if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= n:
        return k
    raise UserError(
        f"top-k {k!r} is invalid for {n} patches; accepted: int 1..{n} or float in (0, 1]"
    )


def attention_topk_iou(a_logits: Tensor, b_logits: Tensor, k: int | float) -> Tensor:
    """IoU of the k most-attended patches of two CLS→patch attention maps, mean over the batch.

    Each map is softmax(logits) over the N patches, averaged over heads: the distribution the model
    actually uses (temperature 1). Ties are broken by ``topk``.

    Args:
        a_logits: ``[B, H, N]`` pre-softmax logits.
        b_logits: ``[B, H, N]`` pre-softmax logits.
        k: patches per set: an int count, or a float fraction of N (0.1 = top 10 %).

    Returns:
        0-dim tensor in ``[0, 1]``: 1 for identical top sets, 0 for disjoint ones.
    """
    # Head counts may differ (a student smaller than its teacher): each map is averaged over its heads.
    if a_logits.ndim != 3 or b_logits.ndim != 3 or a_logits.shape[::2] != b_logits.shape[::2]:
        raise UserError(
            f"attention maps must both be [B, H, N] with the same B and N; got {tuple(a_logits.shape)}, "
            f"{tuple(b_logits.shape)}"
        )
    count = _topk_count(k, a_logits.shape[-1])
    tops = []
    for logits in (a_logits, b_logits):
        probs = F.softmax(logits.float(), dim=-1).mean(dim=1)  # [B, N]
        index = probs.topk(count, dim=-1).indices
        tops.append(torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, index, True))
    inter = (tops[0] & tops[1]).sum(dim=-1).float()
    return (inter / (2 * count - inter)).mean()


def _batch_means(
    student: Features, teacher: Features, tau: float, k: int | float
) -> dict[str, Tensor]:
    """Every diagnostic that is a mean over samples (all but CKA), skipping missing inputs."""
    out = {"cos_cls": cosine(student.cls, teacher.cls)}
    if student.patches is not None and teacher.patches is not None:
        out["cos_patch"] = cosine(student.patches, teacher.patches)
    if student.attn is not None and teacher.attn is not None:
        out["attn_kl"] = attention_kl(student.attn, teacher.attn, tau)
        out["attn_iou"] = attention_topk_iou(student.attn, teacher.attn, k)
    return out


@torch.no_grad()
def representation_report(
    student: Features, teacher: Features, tau: float = 1.0, k: int | float = 0.1
) -> dict[str, float]:
    """Student-vs-teacher diagnostics on one batch.

    Args:
        student: features of the student on distorted images.
        teacher: features of the teacher on the clean images, same order.
        tau: softmax temperature of ``attn_kl`` (KL(teacher ‖ student), as in the loss).
        k: top-k size of ``attn_iou``: int count or fraction of the N patches.

    Returns:
        ``cos_cls``, ``cos_patch``, ``cka_cls`` (over the batch: biased upwards for small B),
        ``attn_kl``, ``attn_iou``; keys whose inputs are None on either side are left out.
    """
    values = _batch_means(student, teacher, tau, k)
    values["cka_cls"] = linear_cka(student.cls, teacher.cls)
    return {key: float(values[key]) for key in KEYS if key in values}


class RepresentationMeter:
    """``representation_report`` over many batches; ``compute()`` equals it on their concatenation.

    Means are weighted by batch size. Linear CKA is no mean of per-batch values, but its
    feature-space form needs only the sums of x, y, xxᵀ, yyᵀ and xyᵀ, so those are accumulated
    exactly, on the features' device in float64: 8·(D1² + D2² + D1·D2) bytes (14 MB at D = 768),
    for any number of samples, with no sample cap and no host sync until ``compute()``.

    Under DDP each process sees its shard; ``compute(gather)`` merges every process's ``state()``
    (counts, means and centred moments, combined as in Chan et al.'s parallel variance), so the
    result equals one process over the whole set. Every process must have seen at least one batch
    (Lightning's distributed sampler pads the shards to equal length).
    """

    def __init__(self, tau: float = 1.0, k: int | float = 0.1):
        self.tau, self.k = tau, k
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._moments: dict[str, Tensor] = {}
        self._n = 0

    @torch.no_grad()
    def update(self, student: Features, teacher: Features) -> None:
        """Adds one batch: student features on distorted images, teacher's on the clean ones."""
        batch = student.cls.shape[0]
        for key, value in _batch_means(student, teacher, self.tau, self.k).items():
            self._sums[key] = self._sums.get(key, 0.0) + value.double() * batch
            self._counts[key] = self._counts.get(key, 0) + batch
        self._add_moments(student.cls.double(), teacher.cls.double())

    def _add_moments(self, x: Tensor, y: Tensor) -> None:
        m = self._moments
        if not m:
            # Shifting by the first batch's mean keeps the raw sums near zero, so removing the mean
            # at the end (Σxyᵀ − n·x̄ȳᵀ) does not cancel away float64 digits when features have a
            # large common offset. Any fixed shift leaves the centred moments unchanged.
            m.update(shift_x=x.mean(dim=0), shift_y=y.mean(dim=0))
            m.update(sx=0.0, sy=0.0, xx=0.0, yy=0.0, xy=0.0)
        x, y = x - m["shift_x"], y - m["shift_y"]
        m["sx"], m["sy"] = m["sx"] + x.sum(dim=0), m["sy"] + y.sum(dim=0)
        m["xx"], m["yy"], m["xy"] = m["xx"] + x.T @ x, m["yy"] + y.T @ y, m["xy"] + x.T @ y
        self._n += x.shape[0]

    def state(self) -> dict[str, Tensor]:
        """Float64 tensors that merge across processes: per-key sums and counts; sample count,
        means and centred second moments of the CLS features (``n``, ``mx``, ``my``, ``cxx``, ...)."""
        out = {}
        for key, total in self._sums.items():
            out[f"sum/{key}"] = total
            out[f"count/{key}"] = torch.tensor(float(self._counts[key]), dtype=torch.float64, device=total.device)
        if self._n:
            m, n = self._moments, self._n
            out["n"] = torch.tensor(float(n), dtype=torch.float64, device=m["sx"].device)
            out["mx"], out["my"] = m["shift_x"] + m["sx"] / n, m["shift_y"] + m["sy"] / n
            out["cxy"] = m["xy"] - torch.outer(m["sx"], m["sy"]) / n
            out["cxx"] = m["xx"] - torch.outer(m["sx"], m["sx"]) / n
            out["cyy"] = m["yy"] - torch.outer(m["sy"], m["sy"]) / n
        return out

    def compute(self, gather: Callable[[dict], dict] | None = None) -> dict[str, float]:
        """The diagnostics over everything seen since ``reset()`` (empty before any update).

        Args:
            gather: collects ``state()`` from every process, each tensor stacked on a new first
                dim (``LightningModule.all_gather``); None: this process's samples only.
        """
        state = self.state() if gather is None else merge_states(gather(self.state()))
        values = {key[4:]: total / state[f"count/{key[4:]}"] for key, total in state.items()
                  if key.startswith("sum/")}
        if "n" in state:
            values["cka_cls"] = _cka_from_covariances(state["cxy"], state["cxx"], state["cyy"])
        return {key: float(values[key]) for key in KEYS if key in values}


def merge_states(stacked: dict[str, Tensor]) -> dict[str, Tensor]:
    """One ``RepresentationMeter.state()`` from several, stacked on dim 0 (one row per process)."""
    out = {k: v.sum(dim=0) for k, v in stacked.items() if k.startswith(("sum/", "count/"))}
    if "n" in stacked:
        n_r = stacked["n"]  # [P]
        n = out["n"] = n_r.sum()
        for mean in ("mx", "my"):
            out[mean] = (n_r[:, None] * stacked[mean]).sum(dim=0) / n
        dx, dy = stacked["mx"] - out["mx"], stacked["my"] - out["my"]  # [P, D]: each shard's offset
        spread = lambda a, b: torch.einsum("p,pi,pj->ij", n_r, a, b)  # noqa: E731
        out["cxy"] = stacked["cxy"].sum(dim=0) + spread(dx, dy)
        out["cxx"] = stacked["cxx"].sum(dim=0) + spread(dx, dx)
        out["cyy"] = stacked["cyy"].sum(dim=0) + spread(dy, dy)
    return out
