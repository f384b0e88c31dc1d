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
from distortkd.vit import Encoder, FrozenTeacher, ToTeacher


def distill_loss(
    student: Encoder,
    teacher: FrozenTeacher,
    distortion: Distortion,
    loss_fn: Callable[..., dict[str, Tensor]],
    images: Tensor,
    seeds: Tensor | None = None,
    with_attn: bool = True,
    contrastive: bool = False,
    to_teacher: ToTeacher | None = None,
) -> dict[str, Tensor]:
    """Teacher on the clean crop, student on the same crop distorted, then the loss terms.

    Args:
        images: clean ``[B, C, H, W]`` in ``[0, 1]`` at the student's resolution, already on the
            device (the teacher resizes its copy to its own).
        seeds: ``[B]`` per-sample seeds (validation) or None (training: global generator).
        with_attn: compute the attention taps (False when the attention weight is 0).
        contrastive: ``loss_fn`` takes pooled embeddings (Contrastive Inversion), not ``Features``.
        to_teacher: maps the student's features to the teacher's width and patch grid (a student
            smaller than its teacher); None or an identity one for the same architecture.
    """
    distorted = distortion(images, seeds)
    if contrastive:
        return loss_fn(student(distorted), teacher(images))
    target = teacher.features(images, with_attn=with_attn)
    feats = student.features(distorted, with_attn=with_attn)
    return loss_fn(feats if to_teacher is None else to_teacher(feats), target)


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
