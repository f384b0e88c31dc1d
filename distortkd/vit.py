"""Encoders built by timm, and the feature taps the distillation loss needs.

No forked ViT: ``extract_features`` runs timm's own modules (``patch_embed``, ``_pos_embed``,
``blocks``, ``norm``) and every block keeps timm's fused SDPA. The CLS→patch attention logits of the
last block are computed beside it from that block's own ``norm1``, ``attn.qkv`` weights, ``q_norm``
and ``k_norm``: only the CLS query row, so no ``[B, H, N+1, N+1]`` tensor is ever allocated and the
extra cost is one ``D×D`` key projection (≈ 1 % of a ViT-S forward).

This module knows nothing about training (no Lightning, no losses).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.models import VisionTransformer, checkpoint_seq
from torch import Tensor, nn

from distortkd.errors import UserError


class Features(NamedTuple):
    """Last-layer features of an encoder.

    Attributes:
        cls: ``[B, D]`` CLS token after the final norm (pooled embedding for CNNs).
        patches: ``[B, N, D]`` patch tokens after the final norm (prefix/register tokens excluded),
            or None for CNNs.
        attn: ``[B, H, N]`` pre-softmax CLS→patch attention logits of the last block
            (``q_cls·k_n / sqrt(d_head)``), or None when not requested or not a ViT.
    """

    cls: Tensor
    patches: Tensor | None = None
    attn: Tensor | None = None


def cls_attention_logits(block: nn.Module, x: Tensor, num_prefix_tokens: int) -> Tensor:
    """CLS→patch attention logits ``[B, H, N]`` that ``block`` computes on its input ``x [B, T, D]``."""
    attn = block.attn
    h = block.norm1(x)
    b, t, _ = h.shape
    dim, heads = attn.num_heads * attn.head_dim, attn.num_heads
    w, bias = attn.qkv.weight, attn.qkv.bias
    # timm's qkv output is laid out [q | k | v]; project the CLS query and all keys only.
    q = F.linear(h[:, :1], w[:dim], None if bias is None else bias[:dim])
    k = F.linear(h, w[dim : 2 * dim], None if bias is None else bias[dim : 2 * dim])
    q = attn.q_norm(q.view(b, 1, heads, -1).transpose(1, 2))
    k = attn.k_norm(k.view(b, t, heads, -1).transpose(1, 2))
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # [B, H, 1, T]
    return logits[:, :, 0, num_prefix_tokens:]


def extract_features(model: VisionTransformer, images: Tensor, with_attn: bool = True) -> Features:
    """Runs a timm ViT on normalised ``images [B, C, H, W]`` and taps its last-layer features.

    Equals ``model.forward_features`` for ``cls``/``patches``; see ``Features`` for shapes.
    """
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    if model.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(model.blocks[:-1], x)
    else:
        x = model.blocks[:-1](x)
    last = model.blocks[-1]
    attn = cls_attention_logits(last, x, model.num_prefix_tokens) if with_attn else None
    x = model.norm(last(x))
    return Features(cls=x[:, 0], patches=x[:, model.num_prefix_tokens :], attn=attn)


class Encoder(nn.Module):
    """A timm backbone with its own input normalisation: callers pass ``[0, 1]`` images.

    Attributes:
        backbone: the timm model (``num_classes=0``).
        embed_dim: width of ``cls`` / the pooled embedding.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        chans = _in_chans(backbone)
        if len(mean) != chans:  # e.g. a 1-channel model with an RGB pretrained cfg
            mean, std = (sum(mean) / len(mean),) * chans, (sum(std) / len(std),) * chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.is_vit = isinstance(backbone, VisionTransformer)
        self.embed_dim = backbone.num_classes or backbone.num_features

    def normalize(self, images: Tensor) -> Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def features(self, images: Tensor, with_attn: bool = True) -> Features:
        """Last-layer features of ``[0, 1]`` images ``[B, C, H, W]``."""
        x = self.normalize(images)
        if self.is_vit:
            return extract_features(self.backbone, x, with_attn)
        return Features(cls=self.backbone(x))

    def forward(self, images: Tensor) -> Tensor:
        """Pooled embedding ``[B, D]`` of ``[0, 1]`` images (the CLS token for ViTs)."""
        return self.backbone(self.normalize(images))

    @property
    def num_heads(self) -> int:
        return self.backbone.blocks[-1].attn.num_heads if self.is_vit else 0

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of a ViT, to reshape ``[B, N, ...]`` into maps."""
        return tuple(self.backbone.patch_embed.grid_size)

    @property
    def img_size(self) -> tuple[int, int] | None:
        """Input ``(height, width)`` in pixels a ViT was built for; None for other models."""
        return tuple(self.backbone.patch_embed.img_size) if self.is_vit else None


def _in_chans(model: nn.Module) -> int:
    """Input channels, read off the first convolution (the pretrained cfg ignores ``in_chans=``)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        base = name.split(".")[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        raise UserError(
            f"unknown model {name!r}; accepted: any timm model name"
            + (f" (closest: {', '.join(close)})" if close else "")
        )


def build_encoder(
    name: str,
    pretrained: bool = True,
    weights_file: str | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    keep_head: bool = False,
    **timm_kwargs,
) -> Encoder:
    """Creates a timm backbone (``num_classes=0``) wrapped with its input normalisation.

    Args:
        name: timm model name, e.g. ``vit_base_patch16_224.dino``.
        pretrained: load weights (from ``weights_file`` if given, else from the hub).
        weights_file: local ``.safetensors``/``.pth``/``.bin``, loaded through timm's
            ``pretrained_cfg_overlay=dict(file=...)``.
        mean, std: normalisation override; default: the model's pretrained cfg.
        keep_head: keep the pretrained head when it is an embedding projection (CLIP's attention
            pool to 512-d), instead of creating the model with ``num_classes=0``.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``in_chans``, ``depth``, ...).

    Raises:
        UserError: unknown name, missing weights file, or hub weights unreachable.
    """
    _check_name(name)
    if weights_file is not None:
        if not Path(weights_file).is_file():
            raise UserError(f"weights_file {weights_file!r} does not exist")
        timm_kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
        pretrained = True
    try:
        if not keep_head:
            timm_kwargs["num_classes"] = 0
        model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    except UserError:
        raise
    except Exception as err:  # hub/network/format failures arrive as many exception types
        if not pretrained or isinstance(err, TypeError):  # the architecture itself: a bad kwarg or value
            shown = {k: v for k, v in timm_kwargs.items() if k != "num_classes"}
            raise UserError(f"timm cannot build model {name!r} with timm_kwargs {shown} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:160] if str(err) else 'no message'})") from None
        raise UserError(
            f"could not load pretrained weights for {name!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160] if str(err) else 'no message'}); offline? "
            f"pass a local file with weights_file=/path/model.safetensors (CLI: model.weights_file=...)"
        ) from None
    cfg = resolve_model_data_config(model)
    return Encoder(model, tuple(mean or cfg["mean"]), tuple(std or cfg["std"]))


def build_vit(name: str, pretrained: bool = True, weights_file: str | None = None, **kwargs) -> Encoder:
    """``build_encoder`` for Vision Transformers; refuses other architectures."""
    enc = build_encoder(name, pretrained=pretrained, weights_file=weights_file, **kwargs)
    if not enc.is_vit:
        raise UserError(f"model {name!r} is not a timm VisionTransformer; the taps need one")
    return enc


def resize_images(images: Tensor, size: tuple[int, int] | None) -> Tensor:
    """``[0, 1]`` images ``[B, C, H, W]`` resized to ``size`` (bilinear, antialiased as the data's
    ``v2.Resize``; its weights are non-negative, so values stay in ``[0, 1]``); unchanged when
    ``size`` is None or already theirs."""
    if size is None or tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def resample_tokens(x: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Tokens ``[B, N, C]`` on a row-major ``grid`` resampled to ``size`` ``(Gh, Gw)``: ``[B, Gh·Gw, C]``.

    Bilinear (``align_corners=False``: token centres, as the patches sit in the image; antialiased
    when shrinking, so a coarser grid averages the tokens it covers instead of skipping some).
    Unchanged when the grids are equal.
    """
    if tuple(grid) == tuple(size):
        return x
    maps = x.transpose(1, 2).unflatten(-1, tuple(grid))  # [B, C, gh, gw]
    out = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out.flatten(2).transpose(1, 2)


class ToTeacher(nn.Module):
    """Maps a student's ``Features`` into its teacher's token space (a student smaller than its teacher).

    - Width: one learned ``nn.Linear(student_dim, teacher_dim)`` for the CLS and the patch tokens
      (both leave the same final norm, so one map serves both, as FitNets' regressor); trained with
      the student, dropped at export. ``nn.Identity`` (no parameters) when the widths match.
    - Grid: patch tokens and attention logits are resampled bilinearly (``resample_tokens``) from
      the student's patch grid to the teacher's, so every loss term compares the teacher's N patches.
      The attention is resampled as *logits*: pre-softmax values stay what the loss expects, and
      interpolating logits interpolates the distributions geometrically (softmax keeps them valid,
      no renormalisation). Linear maps commute, so resampling before projecting gives the same tokens.
    - Heads: left as they are; ``losses.attention_kl`` compares head-averaged distributions when
      the head counts differ.

    Same width and grid: ``forward`` returns its input itself, so the paper's setting is untouched.
    """

    def __init__(self, student_dim: int, teacher_dim: int, student_grid: tuple[int, int] | None = None,
                 teacher_grid: tuple[int, int] | None = None):
        super().__init__()
        self.proj = nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)
        self.student_grid, self.teacher_grid = student_grid, teacher_grid
        self.resample = student_grid is not None and tuple(student_grid) != tuple(teacher_grid)

    @classmethod
    def between(cls, student: Encoder, teacher: Encoder) -> ToTeacher:
        """The map from ``student``'s features to ``teacher``'s (grids only when both are ViTs)."""
        vits = student.is_vit and teacher.is_vit
        return cls(student.embed_dim, teacher.embed_dim, student.grid if vits else None,
                   teacher.grid if vits else None)

    @property
    def identity(self) -> bool:
        return isinstance(self.proj, nn.Identity) and not self.resample

    def forward(self, f: Features) -> Features:
        if self.identity:
            return f
        patches, attn = f.patches, f.attn
        if self.resample:
            patches = None if patches is None else resample_tokens(patches, self.student_grid, self.teacher_grid)
            attn = None if attn is None else resample_tokens(
                attn.transpose(1, 2), self.student_grid, self.teacher_grid).transpose(1, 2)
        return Features(cls=self.proj(f.cls), patches=None if patches is None else self.proj(patches), attn=attn)


class FrozenTeacher(nn.Module):
    """A frozen encoder: no gradients, always in eval mode, forward under ``torch.no_grad()``.

    Every batch is resized to the teacher's own input size (``resize_images``) before it is
    normalised: the data is made at the student's resolution, and a teacher of another resolution
    (a ViT-B/16 at 224 px teaching a student at 112 px) sees it at its own. A no-op when they match.
    """

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.img_size = encoder.img_size

    def train(self, mode: bool = True) -> FrozenTeacher:
        # Lightning calls .train() on the whole module each epoch; dropout/drop-path must stay off.
        return super().train(False)

    @torch.no_grad()
    def features(self, images: Tensor, with_attn: bool = True) -> Features:
        return self.encoder.features(resize_images(images, self.img_size), with_attn)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(resize_images(images, self.img_size))
