"""The op on meta tensors (shape propagation: its fake kernels), for lspt_step and for encoders moved
to 'meta', forward and backward."""
from __future__ import annotations

import pytest
import torch
from helpers import make_vit
from test_step import TINY, make_inputs

from lspt_kernels import GaPTEncoder, LSPTEncoder, VPTEncoder
from lspt_kernels.ops import lspt_step

K = TINY[4]


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
