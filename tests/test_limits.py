"""The fused op at its limits: each either works or fails with a clear error (issue 9, item 3).

- double backward through a fused backend: a clear error naming the eager step (which supports it);
- torch.func.grad / vmap: run the eager step (same maths) with one warning;
- Triton interpreted on the CPU with bfloat16: refused (the interpreter has no bf16 arithmetic);
- meta tensors (lspt_step, and an encoder moved to 'meta'): shapes propagate, forward and backward;
- FlopCounterMode counts the fused op's GEMMs like the eager step's.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import make_vit
from test_step import TINY, make_inputs, upstream

from lspt_kernels import GaPTEncoder, LSPTEncoder, VPTEncoder, ops
from lspt_kernels.ops import lspt_step, step_reference

K = TINY[4]


def _need(backend):
    why = ops.unavailable_reason(backend)
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")


def _step(backend):
    return lambda *a: lspt_step(*a, num_prefix_tokens=K, backend=backend)


# ------------------------------------------------------------------------------------------------
# Double backward
# ------------------------------------------------------------------------------------------------
def test_double_backward_through_fused_op_is_a_clear_error():
    _need("cpu")
    inputs = make_inputs(TINY)
    hidden, new_cell = _step("cpu")(*inputs)
    # create_graph=True itself works: first-order gradients equal the eager step's ...
    g_w = torch.autograd.grad((hidden ** 2).sum() + new_cell.sum(), inputs[4], create_graph=True)[0]
    h_ref, c_ref = step_reference(*inputs, num_prefix_tokens=K)
    g_ref = torch.autograd.grad((h_ref ** 2).sum() + c_ref.sum(), inputs[4], create_graph=True)[0]
    torch.testing.assert_close(g_w, g_ref, atol=1e-5, rtol=1e-5)
    # ... differentiating those gradients again is what the fused backward cannot do.
    with pytest.raises(RuntimeError, match=r"no double backward.*backend='eager'"):
        g_w.square().sum().backward()
    # The eager step named in the message does support it.
    g_ref.square().sum().backward()
    assert inputs[4].grad is not None and inputs[4].grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# torch.func transforms
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(ops, "_warned_func_transform", False)


def test_func_grad_runs_the_eager_step(fresh_warning):
    _need("cpu")
    tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = (t.detach() for t in make_inputs(TINY))
    gh, gc = upstream(TINY, torch.float32, torch.float32, "cpu")

    def loss(w_hh, tokens, step):
        h, c = step(tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh)
        return (h * gh).sum() + (c * gc).sum()

    with pytest.warns(RuntimeWarning, match="torch.func transforms"):
        got = torch.func.grad(loss, argnums=(0, 1))(w_hh, tokens, _step("cpu"))
    want = torch.func.grad(loss, argnums=(0, 1))(w_hh, tokens, _step("reference"))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    # and the transform's result is the plain autograd gradient of the fused op
    w_leaf, t_leaf = w_hh.clone().requires_grad_(), tokens.clone().requires_grad_()
    plain = torch.autograd.grad(loss(w_leaf, t_leaf, _step("cpu")), (w_leaf, t_leaf))
    for g, w in zip(got, plain):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # one warning per process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.func.grad(loss)(w_hh, tokens, _step("cpu"))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # timm's SDPA under vmap
def test_vmap_and_per_sample_grads_over_an_encoder(fresh_warning):
    """Per-sample gradients (vmap over grad over functional_call), the usual torch.func use, through an
    LSPTEncoder whose fused step is on: equal to one autograd backward per image."""
    _need("cpu")
    enc = LSPTEncoder(make_vit(), 3, 5, backend="cpu")
    params = {n: p.detach() for n, p in enc.named_parameters() if p.requires_grad}
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def loss(params, image):
        return torch.func.functional_call(enc, params, (image.unsqueeze(0),)).square().sum()

    with pytest.warns(RuntimeWarning, match="torch.func transforms"):
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, images)
    for i in range(images.shape[0]):
        enc.zero_grad()
        enc(images[i:i + 1]).square().sum().backward()
        for n, p in enc.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[n][i], p.grad, atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------
# Triton interpreter and bfloat16
# ------------------------------------------------------------------------------------------------
def _need_interpreted_triton():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: Triton is compiled, not interpreted")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 is not set")
    _need("triton")


def test_interpreted_triton_refuses_bf16():
    _need_interpreted_triton()
    inputs = make_inputs(TINY, torch.bfloat16)
    with pytest.raises(TypeError, match="Triton interpreter.*bfloat16"):
        _step("triton")(*inputs)
    # the registered op called directly is refused too
    tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = (t.detach() for t in inputs)
    gate_bias = ops.gate_bias_rows(prompt, w_ih, b_ih, b_hh)
    with pytest.raises(TypeError, match="Triton interpreter.*bfloat16"):
        torch.ops.lspt.step_fwd(tokens, cell, gate_bias, w_hh, K, False, "triton")
    # bf16 reached through autocast (fp32 tensors, bf16 GEMM) is refused as well
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="Triton interpreter.*bfloat16"):
            _step("triton")(*make_inputs(TINY))


def test_interpreted_triton_still_runs_fp16():
    _need_interpreted_triton()
    inputs = make_inputs(TINY, torch.float16)
    hidden, _ = _step("triton")(*inputs)
    ref, _ = step_reference(*inputs, num_prefix_tokens=K)
    torch.testing.assert_close(hidden, ref, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------------------------
# Meta tensors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("cell_dtype", [None, torch.float32], ids=["same", "cell32"])
def test_lspt_step_on_meta_tensors(backend, cell_dtype):
    """Shapes and dtypes propagate (a fused backend through the op's fake kernel, which loads nothing),
    forward and backward."""
    dtype = torch.float16
    inputs = tuple(t.detach().to("meta").requires_grad_()
                   for t in make_inputs(TINY, dtype, cell_dtype=cell_dtype))
    hidden, new_cell = lspt_step(*inputs, num_prefix_tokens=K, backend=backend)
    B, n_p, _, D, _ = TINY
    assert hidden.device.type == "meta" and hidden.shape == (B, n_p, D) and hidden.dtype == dtype
    assert new_cell.shape == (B, n_p, D) and new_cell.dtype == (cell_dtype or dtype)
    grads = torch.autograd.grad((hidden.sum(), new_cell.sum()), inputs)
    for g, t in zip(grads, inputs):
        assert g.device.type == "meta" and g.shape == t.shape and g.dtype == t.dtype


@pytest.mark.parametrize("make", [
    lambda v: LSPTEncoder(v, 3, 5, backend="cpu"),
    lambda v: LSPTEncoder(v, 3, 5),
    lambda v: LSPTEncoder(v, 3, 5, lpc="gru", backend="reference"),
    lambda v: GaPTEncoder(v, 3, 5),
    lambda v: VPTEncoder(v, 3, 5),
], ids=["lspt-cpu", "lspt-auto", "lspt-gru", "gapt", "vpt-deep"])
def test_encoder_on_meta(make):
    enc = make(make_vit()).to("meta")
    logits = enc(torch.empty(2, 3, 32, 32, device="meta"))
    assert logits.device.type == "meta" and logits.shape == (2, 5)
    logits.sum().backward()
    for p in enc.trainable_parameters():
        assert p.grad is not None and p.grad.device.type == "meta" and p.grad.shape == p.shape


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_flop_counter_counts_the_fused_op(device):
    if device == "cpu":
        _need("cpu")
    B, n_p, _, D, _ = TINY
    inputs = tuple(t.detach().to(device).requires_grad_() for t in make_inputs(TINY))
    forward = 8 * B * n_p * D * D + 8 * n_p * D * D            # docs/method.md's cost model
    out = {}
    for backend in ("reference", "cpu"):
        fwd = _flops(lambda: out.__setitem__(backend, _step(backend)(*inputs)))
        h, c = out[backend]
        bwd = _flops(lambda: torch.autograd.grad((h.sum(), c.sum()), inputs))
        out[backend] = (fwd, bwd)
    assert out["reference"][0] == out["cpu"][0] == forward
    assert out["reference"][1] == 2 * forward              # eager: dX and dW of both products
    assert out["cpu"][1] == 2 * forward                    # the cpu backend saves its gates: no recompute


def test_flop_counter_counts_the_gate_recompute(monkeypatch):
    """A backend that recomputes the gates in backward (the GPU ones) does one W_hh product more."""
    _need("cpu")
    monkeypatch.setattr(ops, "SAVES_GATES", ())
    B, n_p, _, D, _ = TINY
    inputs = make_inputs(TINY)
    forward = 8 * B * n_p * D * D + 8 * n_p * D * D
    h, c = _step("cpu")(*inputs)
    bwd = _flops(lambda: torch.autograd.grad((h.sum(), c.sum()), inputs))
    assert bwd == 2 * forward + 8 * B * n_p * D * D


def test_flop_counter_on_an_encoder():
    """A whole LSPT forward counts the same FLOPs with the fused step as with the eager one."""
    _need("cpu")
    images = torch.randn(2, 3, 32, 32)
    counts = {b: _flops(lambda: LSPTEncoder(make_vit(), 3, 5, backend=b)(images)) for b in ("reference", "cpu")}
    assert counts["cpu"] == counts["reference"] > 0
