"""Distillation losses as pure functions returning named terms.

Shapes: CLS ``[B, D]``, patch tokens ``[B, N, D]``, CLS→patch attention logits ``[B, H, N]``
(pre-softmax, one row per head). Every function is differentiable in the student's input only
through what the caller passes; the teacher's tensors are expected to be detached already.
``make_loss`` binds a registered loss's parameters into a ``DistillLoss``, which says what it reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from distortkd.errors import unknown
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
    Student and teacher with different head counts (a smaller student): head i of one is not
    head i of the other, so ``head_averaged_attention_kl`` compares their head-averaged maps.

    Args:
        student_logits: ``[B, H, N]`` pre-softmax logits of the student (``[B, H_s, N]``).
        teacher_logits: ``[B, H, N]`` pre-softmax logits of the teacher (``[B, H_t, N]``).
        tau: softmax temperature (> 0); larger values smooth both distributions.
    """
    if tau <= 0:
        raise ValueError(f"attention temperature tau={tau} is out of range; accepted: tau > 0")
    if student_logits.shape[1] != teacher_logits.shape[1]:
        return head_averaged_attention_kl(student_logits, teacher_logits, tau)
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)  # p_t * (log p_t - log p_s)
    return kl.sum(-1).mean()


def head_averaged_attention_kl(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """KL(p̄_teacher ‖ p̄_student) of the head-averaged CLS→patch attention.

    p̄ = mean over heads of softmax(logits / τ) (each head's own distribution first, then their
    mean: the map the CLS token actually attends with, whatever the head count); the KL is summed
    over the N patches and averaged over the batch. ``log p̄`` is taken as
    ``logsumexp_h(log_softmax) − log H`` in fp32, so no log(0) is ever taken.

    Args:
        student_logits: ``[B, H_s, N]`` pre-softmax logits.
        teacher_logits: ``[B, H_t, N]`` pre-softmax logits (H_t may differ from H_s).
        tau: softmax temperature (> 0).
    """
    def log_mean_p(logits: Tensor) -> Tensor:
        log_p = F.log_softmax(logits.float() / tau, dim=-1)
        return torch.logsumexp(log_p, dim=1) - math.log(logits.shape[1])  # [B, N]

    kl = F.kl_div(log_mean_p(student_logits), log_mean_p(teacher_logits), reduction="none", log_target=True)
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

    ``student`` is already in the teacher's token space (``vit.ToTeacher``: same width and patch
    grid); with different head counts the attention term is ``head_averaged_attention_kl``.

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


CONTRASTIVE_VARIANTS = ("one_way", "symmetric")


def contrastive_inversion_loss(
    student: Tensor,
    teacher: Tensor,
    tau: float = 0.1,
    variant: str = "one_way",
    gather: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """InfoNCE between student and teacher embeddings (Contrastive Inversion, Ravula et al. 2021).

    Both embeddings ``[B, D]`` are L2-normalised and compared by cosine / τ. Variants:

    - ``one_way``: for student i the positive is teacher i, the negatives the other teachers;
      mean over the B students.
    - ``symmetric``: SimCLR's NT-Xent over the 2B embeddings (students and teachers together):
      each one is an anchor whose positive is its pair, and its denominator holds every other
      embedding (2B − 1 terms: the positive, the other B − 1 of its own side and the B − 1 of
      the other side; never itself); mean over the 2B anchors, so the pair counts both ways.
      This is ``loss_type: simclr`` of the CI code (``NoisyCLIP.criterion`` in
      github.com/Sriram-Ravula/Contrastive-Inversion, ``noisy_clip_dataparallel.py``), the loss of
      its released config ``config/NoisyRN101/sample.yaml``.

    Args:
        student, teacher: ``[B, D]`` embeddings; the teacher's detached.
        tau: temperature (> 0).
        variant: ``one_way`` or ``symmetric``.
        gather: maps a local ``[B, D]`` to the whole batch over processes ``[N·B, D]`` (e.g.
            ``gather_across_ranks``), so that other processes' samples are negatives too.

    Returns ``{"loss", "loss/nce"}``.

    Raises:
        UserError: unknown ``variant`` (names the accepted ones).
    """
    if variant not in CONTRASTIVE_VARIANTS:
        raise unknown("contrastive loss variant (loss.params.variant)", variant, CONTRASTIVE_VARIANTS)
    if gather is not None:
        student, teacher = gather(student), gather(teacher)
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    idx = torch.arange(len(s), device=s.device)
    if variant == "one_way":
        logits, targets = s @ t.T / tau, idx
    else:
        z = torch.cat([s, t])
        self_pairs = torch.eye(len(z), dtype=torch.bool, device=z.device)
        logits = (z @ z.T / tau).masked_fill(self_pairs, float("-inf"))  # an anchor is not its own negative
        targets = torch.cat([idx + len(s), idx])
    nce = F.cross_entropy(logits, targets)
    return {"loss": nce, "loss/nce": nce}


def gather_across_ranks(x: Tensor) -> Tensor:
    """``x [B, D]`` of every DDP process, concatenated in rank order; ``x`` itself in one process.

    Differentiable (``torch.distributed.nn``'s all_gather): the backward pass sends each process
    the sum, over processes, of the gradients for its own rows. Every process computes the same
    loss over the whole batch, so that sum is N times one process's gradient and DDP's average
    over the N processes gives exactly the gradient of one process with the whole batch.
    Processes may hold batches of different sizes (padded for the collective, then trimmed).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return x
    # Imported here: only builds with torch.distributed have it.
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
    sizes = [int(n) for n in sizes]
    padded = F.pad(x, (0, 0, 0, max(sizes) - len(x)))
    parts = all_gather_with_grad(padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


# Training uses the whole batch over DDP processes as negatives (the CI code's DataParallel
# gathered every GPU's embeddings before its loss, too); in one process gather is the identity.
LOSSES = {
    "multilevel": multilevel_loss,
    "contrastive": partial(contrastive_inversion_loss, gather=gather_across_ranks),
}

NEEDS = ("embeddings", "tokens", "attention")  # what a distillation loss can read, cheapest first


@dataclass(frozen=True)
class DistillLoss:
    """A distillation loss with its parameters bound, and what it reads from the two encoders.

    ``needs``: ``embeddings`` (pooled ``[B, D]``), ``tokens`` (``Features``: CLS and patch tokens)
    or ``attention`` (``Features`` with the last block's CLS attention logits too). The step
    computes exactly that, so a loss needing another tap says so here instead of a flag threaded
    through the CLI, the module and the step.
    """

    fn: Callable[..., dict[str, Tensor]]
    needs: str = "attention"

    def __call__(self, student, teacher) -> dict[str, Tensor]:
        return self.fn(student, teacher)


# What each registered loss reads, from its parameters: multilevel with γ = 0 reads no attention
# (γ defaults to 1 as in ``multilevel_loss``).
READS = {"multilevel": lambda params: "attention" if params.get("gamma", 1.0) else "tokens",
         "contrastive": lambda params: "embeddings"}


def make_loss(name: str, **params) -> DistillLoss:
    """``LOSSES[name]`` with ``params`` bound, and what it reads (``READS``).

    Raises:
        UserError: unknown ``name`` (names the accepted ones).
    """
    if name not in LOSSES:
        raise unknown("loss function", name, LOSSES)
    return DistillLoss(partial(LOSSES[name], **params), READS[name](params))
