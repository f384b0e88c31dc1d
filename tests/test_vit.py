"""Feature taps vs timm's explicit attention, encoders, the frozen teacher, bad input."""

import pytest
import timm
import torch

from distortkd.errors import UserError
from distortkd.vit import FrozenTeacher, build_encoder, build_vit, extract_features

SHAPES = {
    "small": dict(embed_dim=384, depth=2, num_heads=6),  # ViT-S/16 block shapes, 2 blocks
    "base": dict(embed_dim=768, depth=1, num_heads=12),  # ViT-B/16 block shapes, 1 block
    "registers": dict(embed_dim=64, depth=2, num_heads=4, reg_tokens=4, no_embed_class=True),
    "qk_norm": dict(embed_dim=64, depth=2, num_heads=4, qk_norm=True),
}


def _explicit_cls_attention(model, x):
    """Softmax CLS row of the last block from timm's unfused attention path."""
    captured = {}
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("p", i[0]))
    try:
        ref = model.forward_features(x)
    finally:
        hook.remove()
    return ref, captured["p"][:, :, 0, :]  # [B, H, T] over all tokens


@pytest.mark.parametrize("shape", list(SHAPES))
def test_taps_match_timm_explicit_attention(shape):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                              img_size=64, **SHAPES[shape]).eval()
    # non-trivial qkv bias so the slicing of [q | k | v] is exercised
    torch.nn.init.normal_(model.blocks[-1].attn.qkv.bias, std=0.5)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        feats = extract_features(model, x)
        ref, probs = _explicit_cls_attention(model, x)
    npre = model.num_prefix_tokens
    assert feats.attn.shape == (3, model.blocks[-1].attn.num_heads, 16)
    torch.testing.assert_close(feats.cls, ref[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.patches, ref[:, npre:], atol=1e-5, rtol=0)
    # the logits are pre-softmax: log p differs from them by one constant (the log-normaliser) per row
    offset = feats.attn - probs[:, :, npre:].log()
    torch.testing.assert_close(offset, offset[..., :1].expand_as(offset), atol=1e-5, rtol=0)
    renorm = probs[:, :, npre:] / probs[:, :, npre:].sum(-1, keepdim=True)
    torch.testing.assert_close(feats.attn.softmax(-1), renorm, atol=1e-6, rtol=0)


def test_taps_never_build_full_attention_matrix(monkeypatch):
    """Every block runs timm's fused SDPA; no [B, H, T, T] tensor is materialised by the taps."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                              patch_size=8, embed_dim=32, depth=3, num_heads=2)
    feats = extract_features(model, torch.rand(2, 3, 32, 32))
    assert len(calls) == 3 and feats.attn.shape == (2, 2, 16)


def test_encoder_normalises_inside(tiny_vit):
    x = torch.rand(2, 3, 32, 32)
    manual = tiny_vit.backbone.forward_features((x - tiny_vit.mean) / tiny_vit.std)[:, 0]
    torch.testing.assert_close(tiny_vit.features(x).cls, manual)
    torch.testing.assert_close(tiny_vit(x), manual)  # pooled embedding = CLS for 'token' pooling
    assert tiny_vit.embed_dim == 32 and tiny_vit.grid == (4, 4)


def test_one_channel_model_gets_one_channel_stats():
    enc = build_vit("vit_tiny_patch16_224", pretrained=False, in_chans=1, img_size=28, patch_size=7,
                    embed_dim=32, depth=1, num_heads=2)
    assert enc.mean.shape == (1, 1, 1, 1)
    assert enc.features(torch.rand(2, 1, 28, 28)).patches.shape == (2, 16, 32)


def test_frozen_teacher_stays_frozen(tiny_vit):
    teacher = FrozenTeacher(tiny_vit)
    teacher.train()
    assert not teacher.training and not teacher.encoder.training
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher.features(torch.rand(2, 3, 32, 32))
    assert not out.cls.requires_grad and not out.attn.requires_grad


def test_weights_file_round_trip(tmp_path, tiny_vit):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.backbone.state_dict().items()}, str(path))
    loaded = build_vit("vit_tiny_patch16_224", weights_file=str(path), img_size=32, patch_size=8,
                       embed_dim=32, depth=2, num_heads=2)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.features(x).cls, tiny_vit.features(x).cls)


def test_bad_model_name_and_missing_weights(tmp_path):
    with pytest.raises(UserError, match="unknown model 'vit_bas_patch16_224'.*vit_base_patch16_224"):
        build_vit("vit_bas_patch16_224", pretrained=False)
    with pytest.raises(UserError, match="does not exist"):
        build_vit("vit_tiny_patch16_224", weights_file=str(tmp_path / "nope.safetensors"))
    with pytest.raises(UserError, match="not a timm VisionTransformer"):
        build_vit("resnet18", pretrained=False)


def test_offline_hub_error_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        build_vit("vit_tiny_patch16_224.augreg_in21k", pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and "weights_file=" in msg and "vit_tiny_patch16_224.augreg_in21k" in msg


def test_cnn_encoder_keeps_clip_projection():
    enc = build_encoder("resnet18", pretrained=False, keep_head=True, num_classes=16)
    assert enc(torch.rand(2, 3, 64, 64)).shape == (2, 16) and enc.embed_dim == 16
    f = enc.features(torch.rand(2, 3, 64, 64))
    assert f.patches is None and f.attn is None


# --- a student smaller than its teacher: the map into the teacher's token space -------------

WIDE_TEACHER = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)


def test_resample_tokens_keeps_row_major_layout():
    """Each output token comes from its own place on the grid: a token's (row, col) code moves with it."""
    from distortkd.vit import resample_tokens

    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(3.0), indexing="ij")
    tokens = torch.stack([rows, cols], -1).reshape(1, 12, 2)  # [B, N, C], row-major 4x3
    out = resample_tokens(tokens, (4, 3), (8, 6)).reshape(8, 6, 2)
    assert torch.allclose(out[..., 0], out[:, :1, 0].expand(8, 6))  # row code constant along a row
    assert torch.allclose(out[..., 1], out[:1, :, 1].expand(8, 6))  # col code constant along a column
    assert (out[1:, 0, 0] >= out[:-1, 0, 0]).all() and out[0, 0, 0] == 0 and out[-1, 0, 0] == 3
    flat = torch.randn(2, 12, 5)
    assert resample_tokens(flat, (4, 3), (4, 3)) is flat  # same grid: untouched
    const = torch.full((2, 16, 5), 0.7)
    assert torch.allclose(resample_tokens(const, (4, 4), (2, 2)), torch.full((2, 4, 5), 0.7))


def test_to_teacher_projects_and_resamples(tiny_vit):
    from distortkd.vit import ToTeacher

    teacher = build_vit("vit_tiny_patch16_224", pretrained=False, **WIDE_TEACHER)
    to_teacher = ToTeacher.between(tiny_vit, teacher)
    s = tiny_vit.features(torch.rand(2, 3, 32, 32))
    out = to_teacher(s)
    t = teacher.features(torch.rand(2, 3, 32, 32))
    assert out.cls.shape == t.cls.shape == (2, 48) and out.patches.shape == t.patches.shape == (2, 64, 48)
    assert out.attn.shape == (2, 2, 64) and t.attn.shape == (2, 3, 64)  # student heads, teacher patches
    assert isinstance(to_teacher.proj, torch.nn.Linear)
    # Projection and resampling commute (both linear; bilinear weights sum to 1, so the bias passes).
    from distortkd.vit import resample_tokens
    direct = to_teacher.proj(resample_tokens(s.patches, (4, 4), (8, 8)))
    assert torch.allclose(out.patches, direct, atol=1e-5)


def test_to_teacher_is_identity_for_the_same_architecture(tiny_vit):
    from distortkd.vit import ToTeacher

    to_teacher = ToTeacher.between(tiny_vit, tiny_vit)
    feats = tiny_vit.features(torch.rand(2, 3, 32, 32))
    assert to_teacher(feats) is feats and not list(to_teacher.parameters()) and not to_teacher.state_dict()


def test_frozen_teacher_sees_its_own_resolution(tiny_vit):
    """Data at the student's 32 px; a 64 px teacher gets the same batch resized (bilinear, antialias)."""
    import torch.nn.functional as F


    big = build_vit("vit_tiny_patch16_224", pretrained=False, **{**WIDE_TEACHER, "img_size": 64})
    teacher, images = FrozenTeacher(big), torch.rand(2, 3, 32, 32)
    resized = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(teacher.features(images).cls, big.features(resized).cls)
    assert torch.equal(teacher(images), big(resized))
    same = FrozenTeacher(tiny_vit)  # its own size: the batch is passed as it is
    assert torch.equal(same.features(images).cls, tiny_vit.features(images).cls)
