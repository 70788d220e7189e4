"""The Adapter baseline (KMnP/vpt src/models/vit_adapter/adapter_block.py) against python/'s plain
restatement, its init, and its place in the method table."""
import pytest
import torch
from helpers import assert_parity, make_vit
from helpers import vit_images as _images

import lspt_reference as R
from lspt_kernels import AdapterEncoder, LinearProbe
from lspt_kernels.encoders import METHODS, build_encoder

NC = 5


def _perturb(enc, seed=0):
    """Adapter weights away from their (partly zero) init, so every gradient carries information."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if n.startswith("adapters."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("factor", [8, 3])
def test_adapter_matches_reference(small_vit, factor):
    enc = AdapterEncoder(small_vit, NC, reduction_factor=factor)
    _perturb(enc)
    ref = R.ReferenceAdapter(small_vit, NC, reduction_factor=factor)
    assert_parity(enc, ref, _images(small_vit))


@pytest.mark.parametrize("init", ["official", "zero-up"])
def test_adapter_starts_as_the_identity(init):
    vit = make_vit()
    enc = AdapterEncoder(vit, NC, adapter_init=init)
    probe = LinearProbe(vit, NC)
    probe.head.load_state_dict(enc.head.state_dict())
    images = _images(vit)
    torch.testing.assert_close(enc(images), probe(images), atol=0, rtol=0)


def test_official_init_trains_only_the_up_bias():
    """All four tensors zero (adapter_block.py:52-56): act(down(x)) = gelu(0) = 0, so up.weight and
    the down-projection get exactly zero gradient; only up.bias moves. 'zero-up' trains them all."""
    vit = make_vit()
    images = _images(vit)
    enc = AdapterEncoder(vit, NC, adapter_init="official")
    enc(images).square().sum().backward()
    a = enc.adapters[1]
    assert torch.all(a.down.weight.grad == 0) and torch.all(a.down.bias.grad == 0)
    assert torch.all(a.up.weight.grad == 0) and a.up.bias.grad.abs().max() > 0
    enc = AdapterEncoder(vit, NC, adapter_init="zero-up")
    opt = torch.optim.SGD(enc.trainable_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        enc(images).square().sum().backward()
        grads = {n: p.grad.abs().max().item() for n, p in enc.adapters[1].named_parameters()}
        opt.step()
    assert all(v > 0 for v in grads.values()), grads


def test_adapter_parameters_and_table():
    D, L, r = 32, 3, 8
    vit = make_vit(embed_dim=D, depth=L)
    assert METHODS["adapter"] is AdapterEncoder
    enc = build_encoder("adapter", vit, num_prompts=10, prompt_dropout=0.1, num_classes=NC)
    assert enc.num_prompts == 0 and enc.config()["adapter_dim"] == D // r
    report = enc.parameter_report()
    assert report["groups"]["adapters"] == L * (2 * D * (D // r) + D // r + D)
    assert report["trainable"] == report["groups"]["adapters"] + D * NC + NC
    assert set(enc.tuned_state_dict()) == {f"adapters.{i}.{m}.{t}" for i in range(L) for m in ("down", "up")
                                           for t in ("weight", "bias")} | {"head.weight", "head.bias"}
    assert all(not p.requires_grad for p in enc.vit.parameters())


def test_adapter_save_load_and_option_mismatch(tmp_path):
    vit = make_vit()
    a = AdapterEncoder(vit, NC, adapter_init="zero-up")
    _perturb(a)
    a.save_tuned(tmp_path / "a.safetensors")
    b = AdapterEncoder(vit, NC)
    b.load_tuned(tmp_path / "a.safetensors")          # adapter_init only shapes the init: not checked
    images = _images(vit)
    torch.testing.assert_close(a(images), b(images), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"adapter_dim: file 4 vs encoder 8; .*reduction_factor: file 8 vs encoder 4"):
        AdapterEncoder(vit, NC, reduction_factor=4).load_tuned(tmp_path / "a.safetensors")


def test_bad_adapter_options():
    vit = make_vit()
    for bad in (0, 33, 2.5, True):
        with pytest.raises(ValueError, match=r"reduction_factor must be an int in \[1, embed_dim=32\]"):
            AdapterEncoder(vit, NC, reduction_factor=bad)
    with pytest.raises(ValueError, match="adapter_init must be one of"):
        AdapterEncoder(vit, NC, adapter_init="xavier")
