"""Distillation losses as pure functions returning named terms.

Shapes: CLS ``[B, D]``, patch tokens ``[B, N, D]``, CLS→patch attention logits ``[B, H, N]``
(pre-softmax, one row per head). Every function is differentiable in the student's input only
through what the caller passes; the teacher's tensors are expected to be detached already.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distortkd.vit import Features


def cls_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE between CLS embeddings ``[B, D]``, mean over all elements (Eq. 4)."""
    return F.mse_loss(student.float(), teacher.float())


def patch_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE between patch tokens ``[B, N, D]`` at each position, mean over all elements (Eq. 5)."""
    return F.mse_loss(student.float(), teacher.float())


def attention_kl(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """KL(p_teacher ‖ p_student) of CLS→patch attention, each head its own distribution (Eq. 6).

    p = softmax(logits / τ) over the N patches for each (sample, head); the KL is summed over
    patches and averaged over heads and batch. Computed in fp32 from ``log_softmax`` on both sides,
    so a patch with zero teacher probability contributes exactly 0 and no log(0) is ever taken.

    Args:
        student_logits: ``[B, H, N]`` pre-softmax logits of the student.
        teacher_logits: ``[B, H, N]`` pre-softmax logits of the teacher.
        tau: softmax temperature (> 0); larger values smooth both distributions.
    """
    if tau <= 0:
        raise ValueError(f"attention temperature tau={tau} is out of range; accepted: tau > 0")
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)  # p_t * (log p_t - log p_s)
    return kl.sum(-1).mean()


def multilevel_loss(
    student: Features,
    teacher: Features,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
) -> dict[str, Tensor]:
    """α·MSE(CLS) + β·MSE(patches) + γ·KL(attention) (Eq. 7), with each term reported unweighted.

    A weight of 0 skips its term's computation (its entry is then a constant 0). Returns
    ``{"loss", "loss/cls", "loss/patch", "loss/attn"}``.
    """
    zero = student.cls.new_zeros((), dtype=torch.float32)
    terms = {
        "loss/cls": cls_mse(student.cls, teacher.cls) if alpha else zero,
        "loss/patch": patch_mse(student.patches, teacher.patches) if beta else zero,
        "loss/attn": attention_kl(student.attn, teacher.attn, tau) if gamma else zero,
    }
    total = alpha * terms["loss/cls"] + beta * terms["loss/patch"] + gamma * terms["loss/attn"]
    return {"loss": total, **terms}


def contrastive_inversion_loss(student: Tensor, teacher: Tensor, tau: float = 0.1) -> dict[str, Tensor]:
    """One-way InfoNCE from student to teacher (Contrastive Inversion, Ravula et al. 2021).

    Both embeddings ``[B, D]`` are L2-normalised; for student i the positive is teacher i and the
    other teachers in the batch are the negatives. Returns ``{"loss", "loss/nce"}``.
    """
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    logits = s @ t.T / tau
    nce = F.cross_entropy(logits, torch.arange(len(s), device=s.device))
    return {"loss": nce, "loss/nce": nce}


LOSSES = {"multilevel": multilevel_loss, "contrastive": contrastive_inversion_loss}
