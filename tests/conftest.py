"""Shared fixtures: tiny random-init models, nothing downloaded."""

import os

# Tiny models on the 2-core CI machine run ~10x faster on one thread than on two (OpenMP's
# spin-waiting costs more than the parallelism gains); subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture
def tiny_vit():
    from distortkd.vit import build_vit

    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
