"""Bad and unusual input (issue 13, items 1-8): each case gets a clear error naming the argument, or a
documented behaviour that is checked here (README "Bad input")."""
import os
import warnings

import pytest
import torch
from helpers import make_vit

from lspt_kernels import GaPTEncoder, LinearProbe, LSPTEncoder, VPTEncoder, from_timm, load_backbone_checkpoint
from lspt_kernels.checkpoints import as_path
from lspt_kernels.encoders import METHODS, _images_in_model_dtype, build_encoder

NP, NC = 2, 3
PROMPTED = ["vpt-shallow", "vpt-deep", "gapt", "lspt"]


def _enc(method, vit=None, **kw):
    return build_encoder(method, vit if vit is not None else make_vit(), num_prompts=NP, num_classes=NC, **kw)


def _images(batch=2, dtype=torch.float32):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)


# --- 1. images of another float dtype than the model --------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_of_another_float_dtype_are_cast_to_the_model(method, dtype):
    enc = _enc(method).eval()
    images = _images(dtype=dtype)
    with torch.no_grad():
        out = enc(images)
        expected = enc(images.float())      # the same values, cast by the caller
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_timm_alone_fails_on_such_images():
    # Why the cast is there: the timm model itself does not cast (if timm starts to, this tells us).
    with pytest.raises(RuntimeError):
        make_vit()(_images(dtype=torch.float64))


def test_images_cast_up_for_a_double_model():
    enc = _enc("lspt", make_vit().double()).double().eval()
    images = _images()
    with torch.no_grad():
        out = enc(images)
        expected = enc(images.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_image_cast_copies_nothing_when_dtypes_match_and_leaves_autocast_alone():
    w = torch.zeros(1)
    x = torch.randn(2)
    assert _images_in_model_dtype(x, w) is x
    x64 = x.double()
    assert _images_in_model_dtype(x64, w).dtype == torch.float32
    x16 = x.half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _images_in_model_dtype(x16, w) is x16          # autocast casts fp16 itself
        assert _images_in_model_dtype(x64, w).dtype == torch.float32   # but never fp64


@pytest.mark.parametrize("method", ["vpt-deep", "lspt"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_under_autocast(method, dtype):
    enc = _enc(method).eval()
    images = _images(dtype=torch.bfloat16).float()      # values exact in every dtype tested
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(images.to(dtype))
        expected = enc(images)
    # autocast runs the patch-embed convolution in bf16 whatever the input float dtype: same result.
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_image_cast_traces_without_graph_breaks():
    torch._dynamo.reset()
    enc = _enc("vpt-deep").eval()
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images.double()), enc(images), atol=1e-5, rtol=1e-5)


# --- 2. bools are not counts ----------------------------------------------------------------------
@pytest.mark.parametrize("method", PROMPTED)
def test_bool_num_prompts_refused(method):
    with pytest.raises(ValueError, match=r"num_prompts must be an int >= 1, got True \(a bool, not a count\)"):
        build_encoder(method, make_vit(), num_prompts=True, num_classes=NC)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bad", [True, False, 0, 2.0, "3"])
def test_bad_num_classes_refused(method, bad):
    with pytest.raises(ValueError, match=rf"num_classes must be an int >= 1, got {bad!r}"):
        build_encoder(method, make_vit(), num_prompts=NP, num_classes=bad)


# --- 3. kmeans_steps (and lstm_layers) --------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, 0.5, True, None])
def test_bad_kmeans_steps_refused(bad):
    with pytest.raises(ValueError, match=rf"kmeans_steps must be an int >= 0, got {bad!r}"):
        LSPTEncoder(make_vit(), NP, NC, cspc="kmeans", kmeans_steps=bad)


def test_zero_kmeans_steps_keeps_the_initial_centroids():
    enc = LSPTEncoder(make_vit(), NP, NC, cspc="kmeans", kmeans_steps=0).eval()
    assert enc.config()["kmeans_steps"] == 0
    assert enc(_images()).shape == (2, NC)


def test_bool_lstm_layers_refused():
    with pytest.raises(ValueError, match=r"lstm_layers must be an int >= 1, got True"):
        LSPTEncoder(make_vit(), NP, NC, lstm_layers=True)


# --- 4. depth --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, name", [(LSPTEncoder, "LSPT"), (GaPTEncoder, "GaPT")])
def test_one_block_vit_refused_where_the_method_acts_between_blocks(cls, name):
    with pytest.raises(ValueError, match=rf"{name} needs a ViT with at least 2 blocks \(.*\), this one has 1; "
                                         r"use method 'vpt-deep' or 'vpt-shallow'"):
        cls(make_vit(depth=1), NP, NC)


@pytest.mark.parametrize("method", ["linear", "vpt-deep", "vpt-shallow"])
def test_one_block_vit_is_fine_for_vpt_and_linear(method):
    enc = _enc(method, make_vit(depth=1))
    assert enc(_images()).shape == (2, NC)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_block_vit_refused(method):
    with pytest.raises(ValueError, match=r"the ViT has no blocks \(depth=0\)"):
        _enc(method, make_vit(depth=0))


# --- 5. pooling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_pooling_refused(method):
    with pytest.raises(ValueError, match=r"global_pool='' \(no pooling.*global_pool='token'.*'avg'"):
        _enc(method, make_vit(global_pool=""))
    vit = make_vit()
    vit.reset_classifier(0, "")
    with pytest.raises(ValueError, match=r"global_pool=''"):
        _enc(method, vit)


def test_attention_pooling_with_empty_global_pool_name_is_not_refused():
    # 'map' pools with its own attention block: forward_head returns (B, D), so it is a real pooling.
    vit = make_vit(global_pool="map")
    assert _enc("lspt", vit)(_images()).shape == (2, NC)


# --- 6. checkpoint layouts -------------------------------------------------------------------------
def _same_backbone(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


def _zeroed_vit():
    vit = make_vit()
    with torch.no_grad():
        for p in vit.parameters():
            p.zero_()
    return vit


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(5)
    vit = make_vit()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_()
    return vit


@pytest.mark.parametrize("layout", ["ddp", "ddp+epoch", "state_dict", "state_dict-ddp", "mae-ddp"])
def test_ddp_prefix_and_plain_state_dict_load(tmp_path, source, layout):
    sd = source.state_dict()
    ddp = {"module." + k: v for k, v in sd.items()}
    obj = {"ddp": ddp, "ddp+epoch": {**ddp, "epoch": 7}, "state_dict": {"state_dict": sd, "epoch": 7},
           "state_dict-ddp": {"state_dict": ddp}, "mae-ddp": {"model": ddp}}[layout]
    torch.save(obj, tmp_path / "ck.pth")
    vit = load_backbone_checkpoint(_zeroed_vit(), tmp_path / "ck.pth")
    assert _same_backbone(vit, source)


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


# --- 7. paths --------------------------------------------------------------------------------------
class _PathLike:
    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return os.fspath(self.path)


def test_paths_expand_home_and_accept_pathlike(tmp_path, monkeypatch, source):
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(source.state_dict(), tmp_path / "ck.pth")
    for path in ("~/ck.pth", _PathLike("~/ck.pth"), tmp_path / "ck.pth"):
        assert _same_backbone(load_backbone_checkpoint(_zeroed_vit(), path), source)
    enc = from_timm(_zeroed_vit(), checkpoint="~/ck.pth", method="vpt-deep", num_prompts=NP, num_classes=NC)
    assert _same_backbone(enc.vit, source)

    enc.save_tuned("~/tuned.safetensors")
    assert (tmp_path / "tuned.safetensors").is_file()
    other = VPTEncoder(make_vit(), NP, NC)
    other.load_tuned(_PathLike("~/tuned.safetensors"))
    assert torch.equal(other.prompts, enc.prompts)


@pytest.mark.parametrize("bad, kind", [(b"/tmp/ck.pth", "bytes"), (3, "int"), (None, "NoneType"),
                                       (_PathLike(b"/tmp/ck.pth"), "bytes")])
def test_paths_of_other_types_refused(tmp_path, monkeypatch, bad, kind):
    monkeypatch.chdir(tmp_path)
    msg = rf"must be a file path \(str or os.PathLike\), got {kind}"
    with pytest.raises(TypeError, match="path " + msg):
        load_backbone_checkpoint(make_vit(), bad)
    if bad is not None:                                  # checkpoint=None means "no checkpoint"
        with pytest.raises(TypeError, match="checkpoint " + msg):
            from_timm(make_vit(), checkpoint=bad, num_prompts=NP, num_classes=NC)
    enc = VPTEncoder(make_vit(), NP, NC)
    with pytest.raises(TypeError, match="path " + msg):
        enc.save_tuned(bad)
    with pytest.raises(TypeError, match="path " + msg):
        enc.load_tuned(bad)
    assert list(tmp_path.iterdir()) == []                # nothing written under a name like "b'...'"


def test_bytes_path_hint_and_empty_path():
    with pytest.raises(TypeError, match="decode it with os.fsdecode"):
        as_path(b"x.pth")
    with pytest.raises(ValueError, match="checkpoint must be a file path, got an empty string"):
        as_path("", "checkpoint")


def test_save_tuned_into_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"directory .*nope does not exist"):
        VPTEncoder(make_vit(), NP, NC).save_tuned(tmp_path / "nope" / "t.safetensors")


# --- 8. NaN / inf in files -------------------------------------------------------------------------
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


def test_linear_probe_accepts_the_same_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    probe = LinearProbe(make_vit(), NC)
    probe.save_tuned(os.path.join("~", "probe.safetensors"))
    LinearProbe(make_vit(), NC).load_tuned("~/probe.safetensors")
