"""Helpers the test files share (`from helpers import make_vit`); fixtures stay in conftest.py."""
import torch


def make_vit(embed_dim=32, depth=3, heads=2, img=32, patch=8, reg_tokens=0, global_pool="token",
             class_token=True, **kw):
    """A small random timm ViT (nothing downloaded)."""
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img,
                             patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads,
                             reg_tokens=reg_tokens, global_pool=global_pool, class_token=class_token, **kw)
