"""FlopCounterMode counts the fused op's GEMMs (its registered FLOP formulas) like the eager step's."""
from __future__ import annotations

import pytest
import torch
from helpers import make_vit, need_backend
from test_step import TINY, make_inputs

from lspt_kernels import LSPTEncoder, ops
from lspt_kernels.eager import gate_bias_rows
from lspt_kernels.ops import lspt_step

K = TINY[4]


def _step(backend):
    return lambda *a: lspt_step(*a, num_prefix_tokens=K, backend=backend)


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_flop_counter_counts_the_fused_op(device):
    if device == "cpu":
        need_backend("cpu")
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


def test_flop_counter_counts_the_gate_recompute():
    """A forward that saved no gates (the GPU backends never do; the cpu one with save_gates=False)
    recomputes them in backward: one W_hh product more."""
    need_backend("cpu")
    B, n_p, _, D, _ = TINY
    tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = inputs = make_inputs(TINY)
    forward = 8 * B * n_p * D * D + 8 * n_p * D * D
    h, c = ops.fused_step(tokens, cell, gate_bias_rows(prompt, w_ih, b_ih, b_hh), w_hh, K, "cpu", save_gates=False)
    bwd = _flops(lambda: torch.autograd.grad((h.sum(), c.sum()), inputs))
    assert bwd == 2 * forward + 8 * B * n_p * D * D


def test_flop_counter_on_an_encoder():
    """A whole LSPT forward counts the same FLOPs with the fused step as with the eager one."""
    need_backend("cpu")
    images = torch.randn(2, 3, 32, 32)
    counts = {b: _flops(lambda: LSPTEncoder(make_vit(), 3, 5, backend=b)(images)) for b in ("reference", "cpu")}
    assert counts["cpu"] == counts["reference"] > 0
