import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The pure-PyTorch reference (python/) is importable in tests without being installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import pytest  # noqa: E402


def make_vit(embed_dim=32, depth=3, heads=2, img=32, patch=8, reg_tokens=0, global_pool="token",
             class_token=True, **kw):
    """A small random timm ViT (nothing downloaded)."""
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img,
                             patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads,
                             reg_tokens=reg_tokens, global_pool=global_pool, class_token=class_token, **kw)


@pytest.fixture(params=["cls", "reg4-avg"])
def small_vit(request):
    """Two small ViTs: CLS pooling with 1 prefix token; 4 register tokens + 'avg' pooling (k = 5)."""
    if request.param == "cls":
        return make_vit()
    return make_vit(embed_dim=24, depth=4, heads=3, reg_tokens=4, global_pool="avg", img=24)
