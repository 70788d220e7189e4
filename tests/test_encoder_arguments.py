"""Encoder arguments at their edges: bools are not counts, kmeans_steps and lstm_layers, the depth a
method needs, and a ViT without pooling; each a clear error naming the argument, or a documented
behaviour (README "Bad input")."""
import re

import pytest
import torch
from helpers import make_vit

from lspt_kernels import GaPTEncoder, LSPTEncoder
from lspt_kernels.encoders import METHODS, build_encoder

NP, NC = 2, 3
PROMPTED = ["vpt-shallow", "vpt-deep", "gapt", "lspt"]


def _enc(method, vit=None, **kw):
    return build_encoder(method, vit if vit is not None else make_vit(), num_prompts=NP, num_classes=NC, **kw)


def _images(batch=2, dtype=torch.float32):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)


# --- counts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", PROMPTED)
def test_bool_num_prompts_refused(method):
    with pytest.raises(ValueError, match=r"num_prompts must be an int >= 1, got True \(a bool, not a count\)"):
        build_encoder(method, make_vit(), num_prompts=True, num_classes=NC)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bad", [True, False, 0, 2.0, "3"])
def test_bad_num_classes_refused(method, bad):
    with pytest.raises(ValueError, match=rf"num_classes must be an int >= 1, got {bad!r}"):
        build_encoder(method, make_vit(), num_prompts=NP, num_classes=bad)


# --- kmeans_steps and lstm_layers --------------------------------------------------------------------
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


# --- depth -----------------------------------------------------------------------------------------
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


# --- pooling ---------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("bad", ["abc", float("nan"), float("inf"), True, None])
def test_bad_gate_init_is_named(bad):
    with pytest.raises(ValueError, match=rf"gate_init must be a finite number .*, got {re.escape(repr(bad))}"):
        GaPTEncoder(make_vit(), NP, NC, gate_init=bad)
