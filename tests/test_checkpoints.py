"""Backbone checkpoints (MAE, MoCo v3 formats, made here), tuned-parameter files, and their errors."""
import pytest
import timm
import torch
from helpers import make_vit

from lspt_kernels import GaPTEncoder, LSPTEncoder, VPTEncoder, from_timm, load_backbone_checkpoint


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


# --- tuned files: every structural option is checked --------------------------------------------
def _state(enc):
    return {k: v.clone() for k, v in enc.state_dict().items()}


def _unchanged(enc, before):
    after = enc.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before)


def _refuses(enc, path, pattern):
    before = _state(enc)
    with pytest.raises(ValueError, match=pattern):
        enc.load_tuned(path)
    assert _unchanged(enc, before), "a refused file changed the encoder"


def test_load_tuned_lists_every_structural_difference(tmp_path):
    vit = make_vit()
    path = tmp_path / "mean.safetensors"
    LSPTEncoder(vit, 3, 5, cspc="mean").save_tuned(path)
    _refuses(LSPTEncoder(vit, 3, 5, cspc="kmeans"), path, r"cspc: file 'mean' vs encoder 'kmeans'$")
    # Same tensor shapes, three options apart: one message names each.
    _refuses(LSPTEncoder(vit, 3, 5, cspc="none", lpc="lstm", shared_lstm=True, kmeans_steps=5,
                         pool="mae"), path,
             r"cspc: file 'mean' vs encoder 'none'; kmeans_steps: file 3 vs encoder 5; "
             r"pool: file 'model' vs encoder 'mae'$")
    _refuses(LSPTEncoder(vit, 3, 5, lstm_layers=2, shared_lstm=False), path,
             r"lstm_layers: file 1 vs encoder 2; shared_lstm: file True vs encoder False$")
    _refuses(LSPTEncoder(vit, 3, 7), path, r"num_classes: file 5 vs encoder 7$")
    _refuses(LSPTEncoder(make_vit(embed_dim=24), 3, 5), path, r"embed_dim: file 32 vs encoder 24$")
    _refuses(LSPTEncoder(make_vit(depth=4), 3, 5), path, r"depth: file 3 vs encoder 4$")
    VPTEncoder(vit, 3, 5, deep=False).save_tuned(tmp_path / "shallow.safetensors")
    _refuses(VPTEncoder(vit, 3, 5, deep=True), tmp_path / "shallow.safetensors",
             r"holds 'vpt-shallow' parameters, this encoder is 'vpt-deep'")
    # Training-only options (dropout, head init, gate init) do not change what the parameters compute.
    GaPTEncoder(vit, 3, 5, gate_init=5.0, prompt_dropout=0.1, head_init="official").save_tuned(tmp_path / "g.st")
    GaPTEncoder(vit, 3, 5, gate_init=1.0).load_tuned(tmp_path / "g.st")


def _write(path, tensors, metadata):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def test_load_tuned_bad_metadata_and_shapes(tmp_path):
    import json
    vit = make_vit()
    enc = LSPTEncoder(vit, 3, 5)
    tensors = enc.tuned_state_dict()
    _write(tmp_path / "broken.st", tensors, {"lspt_kernels": '{"method": "lspt", "num_prompts": 3'})
    _refuses(enc, tmp_path / "broken.st", r"metadata is not valid JSON \(Expecting .* at character \d+\)")
    _write(tmp_path / "list.st", tensors, {"lspt_kernels": "[1, 2]"})
    _refuses(enc, tmp_path / "list.st", "metadata must be a JSON object with a 'method'")
    _write(tmp_path / "none.st", tensors, {"other": "x"})
    _refuses(enc, tmp_path / "none.st", "has no 'lspt_kernels' metadata")
    # Right options, a tensor of the wrong shape: refused by the shape check, nothing copied.
    bad = dict(tensors, prompts=torch.zeros(3, 3, 31))
    _write(tmp_path / "shape.st", bad, {"lspt_kernels": json.dumps(enc.config())})
    _refuses(enc, tmp_path / "shape.st", r"mismatched \['prompts: file \(3, 3, 31\) vs encoder \(3, 3, 32\)'\]")
    # A file from before pool / embed_dim / depth were recorded: still loads (pool was always 'model').
    old = {k: v for k, v in enc.config().items() if k not in ("pool", "embed_dim", "depth")}
    _write(tmp_path / "old.st", tensors, {"lspt_kernels": json.dumps(old)})
    other = LSPTEncoder(vit, 3, 5)
    other.load_tuned(tmp_path / "old.st")
    assert torch.equal(other.prompts, enc.prompts)
    _refuses(LSPTEncoder(vit, 3, 5, pool="mae"), tmp_path / "old.st", r"pool: file 'model' vs encoder 'mae'")


@pytest.mark.parametrize("method", ["linear", "vpt-shallow", "vpt-deep", "gapt", "lspt", "adapter"])
def test_rebuild_from_saved_config(tmp_path, method):
    """The tools rebuild an encoder from a tuned file's metadata alone: build_encoder(method, vit, **rest)."""
    import json

    from safetensors import safe_open

    from lspt_kernels.encoders import build_encoder
    vit = make_vit()
    enc = build_encoder(method, vit, num_prompts=3, num_classes=5, prompt_dropout=0.1, pool="mae")
    enc.save_tuned(tmp_path / "t.st")
    with safe_open(str(tmp_path / "t.st"), framework="pt") as f:
        config = json.loads(f.metadata()["lspt_kernels"])
    rebuilt = build_encoder(config.pop("method"), make_vit(), **config)
    assert rebuilt.config() == enc.config()
    rebuilt.load_tuned(tmp_path / "t.st")
    with pytest.raises(ValueError, match=rf"cannot build '{method}' around this VisionTransformer: "
                                         r"embed_dim=32 but the vit has embed_dim=24; depth=3 but the vit has depth=4"):
        build_encoder(method, make_vit(embed_dim=24, depth=4, heads=2), **config)
