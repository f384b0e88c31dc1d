"""One step of each method as plain functions: used by the LightningModules and the benchmarks.

Kept free of Lightning so that ``torch.compile`` sees one graph per step and the benchmarks time
exactly what training runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distortkd.distortions import Distortion
from distortkd.losses import DistillLoss
from distortkd.vit import Encoder, Features, FrozenTeacher, ToTeacher


def distill_step(
    student: Encoder,
    teacher: FrozenTeacher,
    distortion: Distortion,
    loss: DistillLoss | Callable[..., dict[str, Tensor]],
    images: Tensor,
    seeds: Tensor | None = None,
    to_teacher: ToTeacher | None = None,
    taps: str | None = None,
) -> tuple[dict[str, Tensor], Features | Tensor, Features | Tensor, Tensor]:
    """Teacher on the clean crop, student on the same crop distorted, then the loss terms.

    Args:
        images: clean ``[B, C, H, W]`` in ``[0, 1]`` at the student's resolution, already on the
            device (the teacher resizes its copy to its own).
        seeds: ``[B]`` per-sample seeds (validation) or None (training: global generator).
        loss: a ``DistillLoss``, whose ``needs`` says what is computed (pooled embeddings, tokens,
            or tokens and attention taps); a plain function of two ``Features`` gets them all.
        to_teacher: maps the student's features to the teacher's width and patch grid (a student
            smaller than its teacher); None or an identity one for the same architecture.
        taps: compute these instead (``tokens`` or ``attention``, never less than the loss
            reads): validation asks for what its diagnostics need, in the same pass.

    Returns:
        ``(terms, student_out, teacher_out, distorted)``: the loss's named terms, what the two
        encoders produced (``Features``, the student's in the teacher's space; pooled ``[B, D]``
        for an embeddings loss without ``taps``) and the distorted images.
    """
    needs = getattr(loss, "needs", "attention")
    distorted = distortion(images, seeds)
    if (taps or needs) == "embeddings":
        s, t = student(distorted), teacher(images)
        return loss(s, t), s, t, distorted
    attn = (taps or needs) == "attention"
    t = teacher.features(images, with_attn=attn)
    s = student.features(distorted, with_attn=attn)
    s = s if to_teacher is None else to_teacher(s)
    terms = loss(s.cls, t.cls) if needs == "embeddings" else loss(s, t)
    return terms, s, t, distorted


def distill_loss(
    student: Encoder,
    teacher: FrozenTeacher,
    distortion: Distortion,
    loss: DistillLoss | Callable[..., dict[str, Tensor]],
    images: Tensor,
    seeds: Tensor | None = None,
    to_teacher: ToTeacher | None = None,
) -> dict[str, Tensor]:
    """The loss terms of ``distill_step`` (training, the benchmarks)."""
    return distill_step(student, teacher, distortion, loss, images, seeds, to_teacher)[0]


def supervised_loss(
    encoder: nn.Module, head: nn.Module, distortion: Distortion, images: Tensor, labels: Tensor,
    seeds: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``head(encoder(distorted))``; returns ``(loss, logits [B, classes])``."""
    logits = head(encoder(distortion(images, seeds)))
    return F.cross_entropy(logits.float(), labels), logits


@torch.no_grad()
def cosine_to_clean(student: nn.Module, teacher: FrozenTeacher, distorted: Tensor, clean: Tensor) -> Tensor:
    """Mean cosine between ``student(distorted)`` and ``teacher(clean)`` pooled embeddings."""
    return F.cosine_similarity(student(distorted).float(), teacher(clean).float(), dim=-1).mean()
