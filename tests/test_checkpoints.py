"""Backbone checkpoints (MAE, MoCo v3, DDP and plain layouts, made here), tuned-parameter files, and
their errors; tensors holding NaN or inf are loaded with a warning naming them."""
import json
import warnings

import pytest
import timm
import torch
from helpers import make_vit, noisy_vit, same_backbone, zeroed_vit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lspt_kernels import GaPTEncoder, LSPTEncoder, VPTEncoder, from_timm, load_backbone_checkpoint
from lspt_kernels.encoders import build_encoder

NP, NC = 2, 3


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


@pytest.fixture(scope="module")
def source():
    return noisy_vit()


@pytest.mark.parametrize("fmt", ["mae", "moco"])
def test_from_timm_loads_official_formats(tmp_path, source_vit, fmt):
    path = (_mae_file if fmt == "mae" else _moco_file)(source_vit, tmp_path / f"{fmt}.pth")
    model = from_timm("vit_tiny_patch16_224", checkpoint=path, num_prompts=4, num_classes=7)
    assert isinstance(model, LSPTEncoder)
    assert same_backbone(model.vit, source_vit)
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
    assert isinstance(model, GaPTEncoder) and same_backbone(model.vit, vit)
    with pytest.raises(ValueError, match="method must be one of"):
        from_timm(make_vit(), method="adapterx", num_classes=3)


def test_pos_embed_resampled_for_other_grid(tmp_path, source_vit):
    path = _mae_file(source_vit, tmp_path / "mae.pth")
    model = from_timm("vit_tiny_patch16_224", checkpoint=path, img_size=160, num_prompts=2, num_classes=3)
    assert model.vit.pos_embed.shape == (1, 1 + 10 * 10, 192)
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, 3)


def _edited(source_vit, edit):
    sd = {k: v.clone() for k, v in source_vit.state_dict().items()}
    edit(sd)
    return sd


BAD_CHECKPOINTS = {        # case: (what the file holds, given the source ViT-Ti; the error's message)
    "missing-key": (lambda vit: {"model": _edited(vit, lambda sd: sd.pop("blocks.0.attn.qkv.weight"))},
                    r"missing keys \['blocks.0.attn.qkv.weight'\]"),
    "mismatched-shape": (lambda vit: {"model": _edited(vit, lambda sd: sd.update(
        {"blocks.1.mlp.fc1.weight": torch.zeros(10, 192)}))},
        r"mismatched shapes blocks.1.mlp.fc1.weight: checkpoint \(10, 192\) vs model \(768, 192\)"),
    "unexpected-key": (lambda vit: _edited(vit, lambda sd: sd.update({"blocks.99.norm1.weight": torch.zeros(192)})),
                       r"unexpected keys \['blocks.99.norm1.weight'\]"),
    "vit-s-into-vit-ti": (lambda vit: {"model": timm.create_model("vit_small_patch16_224", pretrained=False,
                                                                  num_classes=0).state_dict()},
                          r"does not fit VisionTransformer \(embed_dim=192, depth=12\).*mismatched"),
    "a-list": (lambda vit: [1, 2, 3], "expected a checkpoint dict.*got list"),
    "not-moco": (lambda vit: {"state_dict": {"encoder.blocks.0.x": torch.zeros(1)}}, "is not a MoCo v3 checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_by_name(tmp_path, source_vit, case):
    content, message = BAD_CHECKPOINTS[case]
    torch.save(content(source_vit), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        load_backbone_checkpoint(_vit_tiny(), tmp_path / "bad.pth")


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth is not a PyTorch checkpoint"):
        load_backbone_checkpoint(make_vit(), tmp_path / "junk.pth")


def test_a_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_backbone_checkpoint(make_vit(), tmp_path / "nope.pth")


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


@pytest.fixture(scope="module")
def mean_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tuned") / "mean.safetensors"
    LSPTEncoder(make_vit(), 3, 5, cspc="mean").save_tuned(path)
    return path


STRUCTURAL_DIFFERENCES = {      # case: (the loading encoder's ViT and options; the message's end)
    "cspc": (dict(), dict(cspc="kmeans"), r"cspc: file 'mean' vs encoder 'kmeans'$"),
    # Same tensor shapes, three options apart: one message names each.
    "three-at-once": (dict(), dict(cspc="none", lpc="lstm", shared_lstm=True, kmeans_steps=5, pool="mae"),
                      r"cspc: file 'mean' vs encoder 'none'; kmeans_steps: file 3 vs encoder 5; "
                      r"pool: file 'model' vs encoder 'mae'$"),
    "layers-and-sharing": (dict(), dict(lstm_layers=2, shared_lstm=False),
                           r"lstm_layers: file 1 vs encoder 2; shared_lstm: file True vs encoder False$"),
    "num-classes": (dict(), dict(num_classes=7), r"num_classes: file 5 vs encoder 7$"),
    "embed-dim": (dict(embed_dim=24), dict(), r"embed_dim: file 32 vs encoder 24$"),
    "depth": (dict(depth=4), dict(), r"depth: file 3 vs encoder 4$"),
}


@pytest.mark.parametrize("case", list(STRUCTURAL_DIFFERENCES))
def test_load_tuned_names_every_structural_difference(mean_file, case):
    vit_kw, options, message = STRUCTURAL_DIFFERENCES[case]
    _refuses(LSPTEncoder(make_vit(**vit_kw), **dict(dict(num_prompts=3, num_classes=5), **options)), mean_file,
             message)


def test_load_tuned_refuses_another_method(tmp_path):
    vit = make_vit()
    VPTEncoder(vit, 3, 5, deep=False).save_tuned(tmp_path / "shallow.safetensors")
    _refuses(VPTEncoder(vit, 3, 5, deep=True), tmp_path / "shallow.safetensors",
             r"holds 'vpt-shallow' parameters, this encoder is 'vpt-deep'")


def test_training_only_options_need_not_match(tmp_path):
    """Dropout, head init and gate init do not change what the parameters compute."""
    vit = make_vit()
    saved = GaPTEncoder(vit, 3, 5, gate_init=5.0, prompt_dropout=0.1, head_init="official")
    saved.save_tuned(tmp_path / "g.st")
    loaded = GaPTEncoder(vit, 3, 5, gate_init=1.0)
    loaded.load_tuned(tmp_path / "g.st")
    assert torch.equal(loaded.gate_logits, saved.gate_logits)


def _write(path, tensors, metadata):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


BAD_METADATA = {       # case: (the file's metadata, given the encoder's config; the error's message)
    "broken-json": (lambda cfg: {"lspt_kernels": '{"method": "lspt", "num_prompts": 3'},
                    r"metadata is not valid JSON \(Expecting .* at character \d+\)"),
    "a-list": (lambda cfg: {"lspt_kernels": "[1, 2]"}, "metadata must be a JSON object with a 'method'"),
    "none": (lambda cfg: {"other": "x"}, "has no 'lspt_kernels' metadata"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_load_tuned_bad_metadata(tmp_path, case):
    metadata, message = BAD_METADATA[case]
    enc = LSPTEncoder(make_vit(), 3, 5)
    _write(tmp_path / "bad.st", enc.tuned_state_dict(), metadata(enc.config()))
    _refuses(enc, tmp_path / "bad.st", message)


def test_load_tuned_refuses_a_tensor_of_another_shape(tmp_path):
    """Right options, a tensor of the wrong shape: refused by the shape check, nothing copied."""
    enc = LSPTEncoder(make_vit(), 3, 5)
    bad = dict(enc.tuned_state_dict(), prompts=torch.zeros(3, 3, 31))
    _write(tmp_path / "shape.st", bad, {"lspt_kernels": json.dumps(enc.config())})
    _refuses(enc, tmp_path / "shape.st", r"mismatched \['prompts: file \(3, 3, 31\) vs encoder \(3, 3, 32\)'\]")


def test_load_tuned_reads_files_from_before_pool_and_dims_were_recorded(tmp_path):
    """pool was always 'model' then; embed_dim and depth are checked by the tensor shapes."""
    vit = make_vit()
    enc = LSPTEncoder(vit, 3, 5)
    old = {k: v for k, v in enc.config().items() if k not in ("pool", "embed_dim", "depth")}
    _write(tmp_path / "old.st", enc.tuned_state_dict(), {"lspt_kernels": json.dumps(old)})
    other = LSPTEncoder(vit, 3, 5)
    other.load_tuned(tmp_path / "old.st")
    assert torch.equal(other.prompts, enc.prompts)
    _refuses(LSPTEncoder(vit, 3, 5, pool="mae"), tmp_path / "old.st", r"pool: file 'model' vs encoder 'mae'")


def test_save_tuned_records_extra_metadata_beside_the_config(tmp_path):
    """What lspt-train records goes through save_tuned: JSON entries beside "lspt_kernels", which every
    reader still reads (load_tuned, and the metadata reader that returns them decoded)."""
    from lspt_kernels.checkpoints import read_tuned_metadata
    enc = LSPTEncoder(make_vit(), 3, 5)
    record = dict(model="vit_tiny_patch16_224", img_size=32, mean=[0.5, 0.5, 0.5], epoch=3)
    enc.save_tuned(tmp_path / "t.st", metadata={"lspt_train": record})
    with safe_open(str(tmp_path / "t.st"), framework="pt") as f:
        raw = f.metadata()
    assert set(raw) == {"lspt_kernels", "lspt_train"} and json.loads(raw["lspt_train"]) == record
    config, others = read_tuned_metadata(tmp_path / "t.st")
    assert config == enc.config() and others == {"lspt_train": record}
    LSPTEncoder(make_vit(), 3, 5).load_tuned(tmp_path / "t.st")
    with pytest.raises(ValueError, match="metadata must not have a 'lspt_kernels' entry"):
        enc.save_tuned(tmp_path / "u.st", metadata={"lspt_kernels": {}})
    assert not (tmp_path / "u.st").exists()


@pytest.mark.parametrize("method", ["linear", "vpt-shallow", "vpt-deep", "gapt", "lspt", "adapter"])
def test_rebuild_from_saved_config(tmp_path, method):
    """The tools rebuild an encoder from a tuned file's metadata alone: build_encoder(method, vit, **rest)."""
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


# --- checkpoint layouts: DDP prefixes, plain state dicts, foreign prefixes -------------------------
@pytest.mark.parametrize("layout", ["ddp", "ddp+epoch", "state_dict", "state_dict-ddp", "mae-ddp"])
def test_ddp_prefix_and_plain_state_dict_load(tmp_path, source, layout):
    sd = source.state_dict()
    ddp = {"module." + k: v for k, v in sd.items()}
    obj = {"ddp": ddp, "ddp+epoch": {**ddp, "epoch": 7}, "state_dict": {"state_dict": sd, "epoch": 7},
           "state_dict-ddp": {"state_dict": ddp}, "mae-ddp": {"model": ddp}}[layout]
    torch.save(obj, tmp_path / "ck.pth")
    vit = load_backbone_checkpoint(zeroed_vit(), tmp_path / "ck.pth")
    assert same_backbone(vit, source)


def test_partial_module_prefix_is_not_stripped(tmp_path, source):
    sd = dict(source.state_dict())
    sd["module.pos_embed"] = sd.pop("pos_embed")
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \['pos_embed'\].*unexpected keys \['module.pos_embed'\]"):
        load_backbone_checkpoint(make_vit(), tmp_path / "partial.pth")


def test_state_dict_that_is_neither_moco_nor_timm_refused(tmp_path, source):
    sd = {"encoder." + k: v for k, v in source.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"is not a MoCo v3 checkpoint, nor a timm ViT state dict.*first keys: "
                                         r"\['encoder\."):
        load_backbone_checkpoint(make_vit(), tmp_path / "other.pth")


def test_foreign_prefix_is_named_in_the_error(tmp_path, source):
    torch.save({"backbone." + k: v for k, v in source.state_dict().items()}, tmp_path / "prefixed.pth")
    with pytest.raises(ValueError, match=r"carry a prefix 'backbone\.' that the model's do not"):
        load_backbone_checkpoint(make_vit(), tmp_path / "prefixed.pth")


# --- NaN / inf in files ----------------------------------------------------------------------------
def test_non_finite_backbone_tensors_warned_by_name(tmp_path, source):
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    sd["pos_embed"][0, 0, 0] = float("inf")
    torch.save({"model": sd}, tmp_path / "nan.pth")
    with pytest.warns(RuntimeWarning, match=r"nan.pth: 2 tensor\(s\) hold NaN or inf values: \[.*\]$") as rec:
        load_backbone_checkpoint(make_vit(), tmp_path / "nan.pth")
    message = str(rec[0].message)
    assert "'pos_embed'" in message and "'blocks.0.attn.qkv.weight'" in message

    names = [k for k in sd if k.startswith("blocks.1.")]
    for k in names:
        sd[k] = sd[k].clone().fill_(float("-inf"))
    torch.save(sd, tmp_path / "many.pth")
    with pytest.warns(RuntimeWarning, match=rf"{len(names) + 2} tensor\(s\) hold NaN or inf values: \[.*\] \.\.\.$"):
        load_backbone_checkpoint(make_vit(), tmp_path / "many.pth")


def test_finite_files_load_without_warnings(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "ok.pth")
    enc = VPTEncoder(make_vit(), NP, NC)
    enc.save_tuned(tmp_path / "ok.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_backbone_checkpoint(make_vit(), tmp_path / "ok.pth")
        enc.load_tuned(tmp_path / "ok.safetensors")


def test_non_finite_tuned_tensors_warned_by_name(tmp_path):
    enc = LSPTEncoder(make_vit(), NP, NC)
    with torch.no_grad():
        enc.prompts[1, 0, 0] = float("nan")
        enc.head.bias[0] = float("inf")
    path = tmp_path / "diverged.safetensors"
    enc.save_tuned(path)
    other = LSPTEncoder(make_vit(), NP, NC)
    with pytest.warns(RuntimeWarning, match=r"diverged.safetensors: 2 tensor\(s\) hold NaN or inf values: "
                                            r"\['.*', '.*'\]$") as rec:
        other.load_tuned(path)
    message = str(rec[0].message)
    assert "'prompts'" in message and "'head.bias'" in message
    assert torch.isnan(other.prompts[1, 0, 0])           # loaded as it is: a warning, not a refusal


def test_integer_tensors_are_not_checked_for_nan(tmp_path, source):
    sd = dict(source.state_dict())
    torch.save({"model": sd, "step": torch.tensor(3)}, tmp_path / "int.pth")   # outside 'model': ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_backbone_checkpoint(make_vit(), tmp_path / "int.pth")
    from lspt_kernels.checkpoints import _warn_non_finite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_non_finite({"count": torch.tensor([1, 2]), "flag": torch.tensor([True])}, "x")
