"""Shared fixtures: tiny random-init models, nothing downloaded."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture
def tiny_vit():
    from distortkd.vit import build_vit

    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
