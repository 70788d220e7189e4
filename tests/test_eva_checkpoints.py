"""Eva backbone files the timm way: a file in its original release's key names (Meta's DINOv3, BAAI's
EVA-02 MIM pre-training), written here for tiny configs, loads through timm's own checkpoint filter into
exactly the tensors timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))
gives, strictly, and without any download."""
import pytest
import torch
from helpers import EVA_FLAVOURS, make_eva, same_backbone

from lspt_kernels import LSPTEncoder, from_timm, load_backbone_checkpoint
from lspt_kernels.encoders import build_encoder

NP, NC = 2, 3
TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8)


def _noisy(vit, seed=5):
    """Every parameter of `vit` drawn from N(0, 1): a load that left any of them untouched shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return vit


def _dinov3_release(vit) -> dict:
    """A timm DINOv3 state dict in Meta's key names (facebookresearch/dinov3): storage_tokens, ls1/ls2.gamma,
    one qkv bias with its bias_mask (zero for the distilled ViT-S/B/L), the pre-training mask token, the
    rope periods buffer."""
    out = {"mask_token": torch.zeros(1, vit.embed_dim), "rope_embed.periods": torch.ones(4)}
    for k, v in vit.state_dict().items():
        if k.startswith("rope."):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v.clone()
    for i in range(len(vit.blocks)):
        out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * vit.embed_dim)
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * vit.embed_dim)
    return out


def _eva02_release(vit) -> dict:
    """A timm EVA-02 (B config: separate q/k/v, SwiGLU with its norm) state dict in BAAI's MIM pre-training
    key names (baaivision/EVA EVA-02): q_bias / v_bias, mlp.w1 / w2 / w3 / ffn_ln, the final norm as `norm`,
    mask token, MIM head and rope buffers, under {'module': ...} as its DeepSpeed saves."""
    swaps = [("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"), ("mlp.fc1_g", "mlp.w1"),
             ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3"), ("mlp.norm", "mlp.ffn_ln"), ("fc_norm.", "norm.")]
    out = {"mask_token": torch.zeros(1, 1, vit.embed_dim), "lm_head.weight": torch.zeros(8, vit.embed_dim),
           "lm_head.bias": torch.zeros(8), "rope.freqs_cos": torch.ones(16, 16), "rope.freqs_sin": torch.zeros(16, 16)}
    for k, v in vit.state_dict().items():
        if k.startswith("rope."):
            continue
        for a, b in swaps:
            k = k.replace(a, b)
        out[k] = v.clone()
    return {"module": out}


RELEASES = {"dinov3": _dinov3_release, "eva02-base": _eva02_release}


@pytest.fixture
def offline(monkeypatch):
    """No network: the Hugging Face hub offline, and timm's download helpers raise if anything calls them."""
    import timm.models._builder as builder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")
    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        if hasattr(builder, name):
            monkeypatch.setattr(builder, name, no_download)


@pytest.mark.parametrize("flavour", list(RELEASES))
def test_release_file_loads_as_timms_pretrained_cfg_overlay(tmp_path, offline, flavour):
    import timm
    source = _noisy(make_eva(flavour))
    path = tmp_path / f"{flavour}.pth"
    torch.save(RELEASES[flavour](source), path)
    target = make_eva(flavour)
    enc = from_timm(target, checkpoint=path, method="lspt", num_prompts=NP, num_classes=NC)
    assert isinstance(enc, LSPTEncoder) and enc.pool == "model"
    assert same_backbone(enc.vit, source)
    name, extra = EVA_FLAVOURS[flavour]
    timms = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0,
                              **TINY, **extra)
    assert same_backbone(enc.vit, timms)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, NC)


def test_an_eva_file_under_model_is_not_taken_for_mae(tmp_path):
    """{'model': ...} is MAE's wrapper for a ViT; an Eva release wrapped so (EVA-01 style) keeps the model's
    own pooling."""
    source = _noisy(make_eva("eva02-base"))
    torch.save({"model": _eva02_release(source)["module"]}, tmp_path / "eva.pth")
    enc = from_timm(make_eva("eva02-base"), checkpoint=tmp_path / "eva.pth", method="vpt-deep", num_prompts=NP,
                    num_classes=NC)
    assert enc.pool == "model" and same_backbone(enc.vit, source)


def test_safetensors_file_of_timm_keys(tmp_path):
    from safetensors.torch import save_file
    source = _noisy(make_eva("dinov3"))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "dinov3.safetensors"))
    assert same_backbone(load_backbone_checkpoint(make_eva("dinov3"), tmp_path / "dinov3.safetensors"), source)


def _deeper_file(tmp_path):
    torch.save(_dinov3_release(make_eva("dinov3", depth=3)), tmp_path / "deeper.pth")
    return tmp_path / "deeper.pth"


def _wider_file(tmp_path):
    torch.save(_dinov3_release(make_eva("dinov3", embed_dim=48)), tmp_path / "wider.pth")
    return tmp_path / "wider.pth"


def _junk_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    return tmp_path / "junk.pth"


@pytest.mark.parametrize("make, error, message", [
    (lambda tmp: tmp / "nope.pth", FileNotFoundError, r"checkpoint file not found: .*nope\.pth"),
    (_deeper_file, ValueError, r"deeper\.pth \(after timm's checkpoint filter for Eva\) does not fit Eva "
                               r"\(embed_dim=32, depth=2\): unexpected keys \['blocks\.2\."),
    (_wider_file, ValueError, r"wider\.pth \(after timm's checkpoint filter for Eva\) does not fit Eva .*mismatched "
                              r"shapes cls_token: checkpoint \(1, 1, 48\) vs model \(1, 1, 32\)"),
    (_junk_file, ValueError, r"junk\.pth is not a checkpoint timm can read"),
], ids=["missing", "deeper", "wider", "junk"])
def test_a_file_that_does_not_fit_is_refused_by_name(tmp_path, offline, make, error, message):
    vit = make_eva("dinov3")
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(error, match=message):
        from_timm(vit, checkpoint=make(tmp_path), num_prompts=NP, num_classes=NC)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())      # nothing half-loaded


def test_a_missing_key_is_named(tmp_path):
    sd = _dinov3_release(make_eva("dinov3"))
    del sd["blocks.1.ls2.gamma"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.gamma_2'\]"):
        build_encoder("linear", load_backbone_checkpoint(make_eva("dinov3"), tmp_path / "partial.pth"), num_classes=NC)
