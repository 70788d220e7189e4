"""Backbone checkpoints (MAE, MoCo v3 formats, made here), tuned-parameter files, and their errors."""
import pytest
import timm
import torch
from conftest import make_vit

from lspt_kernels import GaPTEncoder, LSPTEncoder, from_timm, load_backbone_checkpoint


def _vit_tiny():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)


@pytest.fixture(scope="module")
def source_vit():
    torch.manual_seed(3)
    return _vit_tiny()


def _mae_file(vit, path):
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    # The MAE pre-training file can carry the decoder and mask token: they must be dropped.
    sd["mask_token"] = torch.zeros(1, 1, 512)
    sd["decoder_embed.weight"] = torch.zeros(512, vit.embed_dim)
    torch.save({"model": sd, "epoch": 799}, path)
    return path


def _moco_file(vit, path):
    sd = {}
    for k, v in vit.state_dict().items():
        sd["module.base_encoder." + k] = v.clone()
        sd["module.momentum_encoder." + k] = torch.zeros_like(v)
    sd["module.base_encoder.head.0.weight"] = torch.zeros(4096, vit.embed_dim)   # projector
    sd["module.predictor.0.weight"] = torch.zeros(4096, 256)
    torch.save({"state_dict": sd, "epoch": 300, "arch": "vit_base"}, path)
    return path


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


@pytest.mark.parametrize("fmt", ["mae", "moco"])
def test_from_timm_loads_official_formats(tmp_path, source_vit, fmt):
    path = (_mae_file if fmt == "mae" else _moco_file)(source_vit, tmp_path / f"{fmt}.pth")
    model = from_timm("vit_tiny_patch16_224", checkpoint=path, num_prompts=4, num_classes=7)
    assert isinstance(model, LSPTEncoder)
    assert _same_weights(model.vit, source_vit)
    assert all(not p.requires_grad for p in model.vit.parameters())
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


def test_from_timm_module_and_methods(tmp_path):
    vit = make_vit()
    path = tmp_path / "plain.pth"
    torch.save(vit.state_dict(), path)
    fresh = make_vit()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    model = from_timm(fresh, checkpoint=path, method="gapt", num_prompts=2, num_classes=3)
    assert isinstance(model, GaPTEncoder) and _same_weights(model.vit, vit)
    with pytest.raises(ValueError, match="method must be one of"):
        from_timm(make_vit(), method="adapterx", num_classes=3)


def test_pos_embed_resampled_for_other_grid(tmp_path, source_vit):
    path = _mae_file(source_vit, tmp_path / "mae.pth")
    model = from_timm("vit_tiny_patch16_224", checkpoint=path, img_size=160, num_prompts=2, num_classes=3)
    assert model.vit.pos_embed.shape == (1, 1 + 10 * 10, 192)
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, 3)


def test_bad_checkpoints(tmp_path, source_vit):
    sd = {k: v.clone() for k, v in source_vit.state_dict().items()}
    missing = dict(sd)
    del missing["blocks.0.attn.qkv.weight"]
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.attn.qkv.weight'\]"):
        load_backbone_checkpoint(_vit_tiny(), tmp_path / "missing.pth")

    wrong = dict(sd)
    wrong["blocks.1.mlp.fc1.weight"] = torch.zeros(10, 192)
    torch.save({"model": wrong}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"mismatched shapes blocks.1.mlp.fc1.weight: checkpoint \(10, 192\) "
                                         r"vs model \(768, 192\)"):
        load_backbone_checkpoint(_vit_tiny(), tmp_path / "wrong.pth")

    extra = dict(sd, **{"blocks.99.norm1.weight": torch.zeros(192)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.99.norm1.weight'\]"):
        load_backbone_checkpoint(_vit_tiny(), tmp_path / "extra.pth")

    # A ViT-S checkpoint into a ViT-Ti: every shape differs.
    small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    torch.save({"model": small.state_dict()}, tmp_path / "vits.pth")
    with pytest.raises(ValueError, match=r"does not fit VisionTransformer \(embed_dim=192, depth=12\).*mismatched"):
        load_backbone_checkpoint(_vit_tiny(), tmp_path / "vits.pth")

    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth is not a PyTorch checkpoint"):
        load_backbone_checkpoint(_vit_tiny(), tmp_path / "junk.pth")

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a checkpoint dict.*got list"):
        load_backbone_checkpoint(_vit_tiny(), tmp_path / "list.pth")

    torch.save({"state_dict": {"encoder.blocks.0.x": torch.zeros(1)}}, tmp_path / "notmoco.pth")
    with pytest.raises(ValueError, match="is not a MoCo v3 checkpoint"):
        load_backbone_checkpoint(_vit_tiny(), tmp_path / "notmoco.pth")

    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_backbone_checkpoint(_vit_tiny(), tmp_path / "nope.pth")


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="not a PyTorch checkpoint.*weights_only"):
        load_backbone_checkpoint(_vit_tiny(), tmp_path / "evil.pth")


def test_save_and_load_tuned(tmp_path):
    vit = make_vit()
    a = LSPTEncoder(vit, 3, 5, backend="reference")
    path = tmp_path / "task.safetensors"
    a.save_tuned(path)
    from safetensors.torch import load_file
    saved = load_file(str(path))
    assert set(saved) == set(a.tuned_state_dict())           # no backbone weights
    assert not any(k.startswith("vit.") for k in saved)
    b = LSPTEncoder(vit, 3, 5, backend="reference")
    assert not torch.equal(a.prompts, b.prompts)
    b.load_tuned(path)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(images), b(images), atol=0, rtol=0)

    with pytest.raises(ValueError, match="holds 'lspt' parameters, this encoder is 'gapt'"):
        GaPTEncoder(vit, 3, 5).load_tuned(path)
    with pytest.raises(ValueError, match=r"other 'lspt' options than this encoder: num_prompts: file 3 vs encoder 4$"):
        LSPTEncoder(vit, 4, 5).load_tuned(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        b.load_tuned(tmp_path / "junk.safetensors")


def test_tuned_file_is_small_for_vit_b(tmp_path):
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model = LSPTEncoder(vit, 10, 200)
    path = tmp_path / "vitb.safetensors"
    model.save_tuned(path)
    size = path.stat().st_size
    expected = 4 * (12 * 10 * 768 + 8 * 768 * 768 + 8 * 768 + 768 * 200 + 200)
    assert expected <= size < expected + 4096        # ~20 MB, not the 330 MB backbone
