"""Eva backbone files the timm way: a file in its original release's key names (Meta's DINOv3, BAAI's
EVA-02 MIM pre-training), written here for tiny configs, loads through timm's own checkpoint filter into
exactly the tensors timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))
gives, strictly, and without any download."""
import pytest
import torch
from helpers import EVA_FLAVOURS, dinov3_release, eva02_release, make_eva, noisy, same_backbone

from lspt_kernels import LSPTEncoder, from_timm, load_backbone_checkpoint
from lspt_kernels.encoders import build_encoder

NP, NC = 2, 3
TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8)


RELEASES = {"dinov3": dinov3_release, "eva02-base": eva02_release}


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
    source = noisy(make_eva(flavour))
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
    source = noisy(make_eva("eva02-base"))
    torch.save({"model": eva02_release(source)["module"]}, tmp_path / "eva.pth")
    enc = from_timm(make_eva("eva02-base"), checkpoint=tmp_path / "eva.pth", method="vpt-deep", num_prompts=NP,
                    num_classes=NC)
    assert enc.pool == "model" and same_backbone(enc.vit, source)


def test_safetensors_file_of_timm_keys(tmp_path):
    from safetensors.torch import save_file
    source = noisy(make_eva("dinov3"))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "dinov3.safetensors"))
    assert same_backbone(load_backbone_checkpoint(make_eva("dinov3"), tmp_path / "dinov3.safetensors"), source)


def _deeper_file(tmp_path):
    torch.save(dinov3_release(make_eva("dinov3", depth=3)), tmp_path / "deeper.pth")
    return tmp_path / "deeper.pth"


def _wider_file(tmp_path):
    torch.save(dinov3_release(make_eva("dinov3", embed_dim=48)), tmp_path / "wider.pth")
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
    sd = dinov3_release(make_eva("dinov3"))
    del sd["blocks.1.ls2.gamma"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.gamma_2'\]"):
        build_encoder("linear", load_backbone_checkpoint(make_eva("dinov3"), tmp_path / "partial.pth"), num_classes=NC)
