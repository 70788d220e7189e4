"""The fused op at its limits: each either works or fails with a clear error.

- double backward through a fused backend: a clear error naming the eager step (which supports it),
  from the C++ autograd and from the Python one alike;
- torch.func.grad / vmap: run the eager step (same maths) with one warning;
- Triton interpreted on the CPU with bfloat16: refused (the interpreter has no bf16 arithmetic);
- Triton's 32-bit offsets: a batch whose B*Np*4D reaches 2^31 runs in chunks of whole images.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import make_vit, need_backend
from test_step import TINY, make_inputs, upstream

from lspt_kernels import LSPTEncoder, ops
from lspt_kernels.eager import gate_bias_rows, lspt_step_eager
from lspt_kernels.ops import lspt_step

K = TINY[4]


def _step(backend):
    return lambda *a: lspt_step(*a, num_prefix_tokens=K, backend=backend)


# ------------------------------------------------------------------------------------------------
# Double backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "meta"], ids=["cpp-autograd", "python-autograd"])
def test_double_backward_through_fused_op_is_a_clear_error(device):
    """The cpu backend's autograd is C++ (csrc/autograd.cpp); meta tensors, which no extension
    registers, run the Python formula (lspt_kernels/ops.py): both refuse a second derivative alike."""
    need_backend("cpu")
    inputs = tuple(t.detach().to(device).requires_grad_() for t in make_inputs(TINY))
    hidden, new_cell = _step("cpu")(*inputs)
    if device == "meta":
        g_w = torch.autograd.grad((hidden ** 2).sum() + new_cell.sum(), inputs[4], create_graph=True)[0]
        with pytest.raises(RuntimeError, match=r"no double backward.*backend='eager'"):
            g_w.sum().backward()
        return
    # create_graph=True itself works: first-order gradients equal the eager step's ...
    g_w = torch.autograd.grad((hidden ** 2).sum() + new_cell.sum(), inputs[4], create_graph=True)[0]
    h_ref, c_ref = lspt_step_eager(*inputs, num_prefix_tokens=K)
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
    need_backend("cpu")
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
    need_backend("cpu")
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
    need_backend("triton")


def test_interpreted_triton_refuses_bf16():
    _need_interpreted_triton()
    inputs = make_inputs(TINY, torch.bfloat16)
    with pytest.raises(TypeError, match="Triton interpreter.*bfloat16"):
        _step("triton")(*inputs)
    # the registered op called directly is refused too
    tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = (t.detach() for t in inputs)
    gate_bias = gate_bias_rows(prompt, w_ih, b_ih, b_hh)
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
    ref, _ = lspt_step_eager(*inputs, num_prefix_tokens=K)
    torch.testing.assert_close(hidden, ref, atol=2e-3, rtol=2e-3)




# ------------------------------------------------------------------------------------------------
# Triton's 32-bit offsets
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_image", [False, True], ids=["shared-rows", "per-image-rows"])
def test_triton_chunks_a_batch_past_its_index_limit(monkeypatch, per_image):
    """B*Np*4D >= 2^31 (batch 8192 at Np 100, D 768) used to be refused; the launchers now split the
    batch into chunks of whole images. Checked with the limit lowered so that 7 images make 4 chunks:
    forward and every gradient equal the unchunked kernels' and the eager step's."""
    _need_interpreted_triton()
    from lspt_kernels import triton_kernels as tk
    B, n_p, N, D, k = 7, 9, 4, 8, 1           # a chunk: 2 images' 2*9*32 = 576 offsets (> 4D*D = 256)
    tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = make_inputs((B, n_p, N, D, k))
    if per_image:
        prompt = prompt * torch.rand(B, n_p, D, generator=torch.Generator().manual_seed(4))
    grads = upstream((B, n_p, N, D, k), torch.float32, torch.float32, "cpu")
    params = (tokens, cell, w_ih, w_hh, b_ih, b_hh)
    out = {}
    for name, limit in (("whole", tk.INDEX_LIMIT), ("chunked", 2 * n_p * 4 * D), ("eager", None)):
        monkeypatch.setattr(tk, "INDEX_LIMIT", limit or tk.INDEX_LIMIT)
        if name == "chunked":
            assert tk.image_chunks(B, n_p, D) == [(0, 2), (2, 4), (4, 6), (6, 7)]
        gb = gate_bias_rows(prompt, w_ih, b_ih, b_hh)
        h, c = ops.fused_step(tokens, cell, gb, w_hh, k, "eager" if name == "eager" else "triton")
        out[name] = [h, c, *torch.autograd.grad((h, c), params, grads)]
    for g, w, r in zip(out["chunked"], out["whole"], out["eager"]):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_triton_refuses_what_no_chunk_fixes(monkeypatch):
    _need_interpreted_triton()
    from lspt_kernels import triton_kernels as tk
    monkeypatch.setattr(tk, "INDEX_LIMIT", 3 * 4 * 8 - 1)     # one image's Np*4D rows alone reach it
    with pytest.raises(ValueError, match=r"one image's Np\*4D or the weight's 4D\*D"):
        tk.image_chunks(2, 3, 8)
