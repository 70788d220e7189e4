"""Self-checking fused kernels (lspt_kernels/selfcheck.py), exercised on the CPU.

The GPU backends are checked by default; LSPT_SELFCHECK=all checks the C++ CPU backend too, which is
how these tests run the whole mechanism without a GPU: a deliberately wrong kernel (forward or backward
perturbed, or one that raises) is swapped into the backend registry, and the check must catch it, fall
back to the eager step with one warning, or raise under LSPT_SELFCHECK=strict, and run once per
(backend, device, dtype, width).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_vit
from test_step import TINY, make_inputs

from lspt_kernels import LSPTEncoder, ops, selfcheck
from lspt_kernels.ops import lspt_step, step_reference

K = TINY[4]


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    if ops.unavailable_reason("cpu"):
        pytest.skip(f"cpu backend unavailable: {ops.unavailable_reason('cpu')}")
    monkeypatch.setenv("LSPT_SELFCHECK", "all")
    selfcheck.reset()
    yield
    selfcheck.reset()


class Injected:
    """The real cpu kernels with one fault; counts the forward calls."""

    def __init__(self, fault):
        self.real, self.fault, self.forward_calls = ops._KERNELS["cpu"], fault, 0

    def forward(self, *args):
        self.forward_calls += 1
        hidden, new_cell, xhat, gates = self.real.forward(*args)
        if self.fault == "raise":
            raise RuntimeError("no kernel image is available for execution on the device")
        if self.fault == "forward":
            hidden = hidden + 0.05
        return hidden, new_cell, xhat, gates

    def backward(self, *args):
        grads = list(self.real.backward(*args))
        if self.fault == "backward":
            grads[3] = grads[3] * 1.1     # grad_weight_hh (grad_tokens, grad_cell, grad_gate_bias, grad_w_hh)
        return tuple(grads)


@pytest.fixture
def inject(monkeypatch):
    def make(fault):
        bad = Injected(fault)
        monkeypatch.setitem(ops._KERNELS, "cpu", ops.Kernels(bad.forward, bad.backward))
        return bad
    return make


def _step(inputs, backend="cpu"):
    return lspt_step(*inputs, num_prefix_tokens=K, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_real_cpu_kernels_pass(dtype):
    ok, reason = selfcheck.check_backend("cpu", "cpu", dtype, width=16)
    assert ok and reason == "", reason


@pytest.mark.parametrize("fault, culprit", [("forward", "hidden is off"), ("backward", "grad_weight_hh is off"),
                                            ("raise", "it raised RuntimeError: no kernel image")])
def test_wrong_kernel_is_caught_and_falls_back_with_one_warning(inject, fault, culprit):
    bad = inject(fault)
    inputs = make_inputs(TINY)
    with pytest.warns(RuntimeWarning, match=rf"'cpu' step kernels failed their self-check.*{culprit}.*"
                                            r"using the 'eager' step") as record:
        hidden, new_cell = _step(inputs)
    assert len([w for w in record if "self-check" in str(w.message)]) == 1
    want = step_reference(*inputs, num_prefix_tokens=K)
    torch.testing.assert_close(hidden, want[0], atol=0, rtol=0)   # the eager step ran, exactly
    # Later calls: no second check, no second warning, still the eager step.
    calls = bad.forward_calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hidden2, _ = _step(inputs)
        _step(make_inputs(TINY, seed=3), backend="auto")          # "auto" picks cpu: same key, same answer
    assert bad.forward_calls == calls
    torch.testing.assert_close(hidden2, want[0], atol=0, rtol=0)


def test_strict_makes_a_failure_an_error(inject, monkeypatch):
    inject("forward")
    monkeypatch.setenv("LSPT_SELFCHECK", "all,strict")
    with pytest.raises(RuntimeError, match=r"self-check: the 'cpu' step kernels disagree.*hidden is off"):
        _step(make_inputs(TINY))
    monkeypatch.setenv("LSPT_SELFCHECK", "error all")
    selfcheck.reset()
    with pytest.raises(RuntimeError, match="LSPT_SELFCHECK=strict"):
        _step(make_inputs(TINY))


def test_off_switch(inject, monkeypatch):
    """LSPT_SELFCHECK=0: no check runs, so the (here deliberately wrong) kernel is used as is."""
    bad = inject("forward")
    monkeypatch.setenv("LSPT_SELFCHECK", "0")
    inputs = make_inputs(TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hidden, _ = _step(inputs)
    assert bad.forward_calls == 1
    torch.testing.assert_close(hidden, step_reference(*inputs, num_prefix_tokens=K)[0] + 0.05)


def test_cpu_is_not_checked_by_default(inject, monkeypatch):
    """Default: only the GPU backends check themselves; the C++ CPU backend is covered by the tests."""
    bad = inject("forward")
    monkeypatch.delenv("LSPT_SELFCHECK")
    _step(make_inputs(TINY))
    assert bad.forward_calls == 1 and not selfcheck._results


def test_cached_per_backend_device_dtype_width(inject):
    bad = inject(None)                      # a correct kernel, counted
    for _ in range(3):
        _step(make_inputs(TINY))
    after_fp32 = bad.forward_calls
    assert after_fp32 == 1 + 3              # one check (one tiny problem, one layout), three real calls
    _step(make_inputs(TINY, torch.float64))
    assert bad.forward_calls == after_fp32 + 2          # fp64 is its own check
    _step(make_inputs((2, 3, 5, 24, 1)))
    assert bad.forward_calls == after_fp32 + 4          # so is another width
    assert set(selfcheck._results) == {("cpu", "cpu", torch.float32, 16), ("cpu", "cpu", torch.float64, 16),
                                       ("cpu", "cpu", torch.float32, 24)}
    assert all(ok for ok, _ in selfcheck._results.values())


def test_check_leaves_the_caller_alone():
    """No global RNG draw, and it runs under no_grad / inference_mode (where models are evaluated)."""
    state = torch.get_rng_state()
    with torch.inference_mode():
        hidden, _ = _step([t.detach() for t in make_inputs(TINY)])
    assert selfcheck._results[("cpu", "cpu", torch.float32, 16)] == (True, "")
    assert torch.equal(torch.get_rng_state(), state)
    assert not hidden.requires_grad


def test_encoder_falls_back_as_a_whole(inject):
    """An LSPTEncoder on "auto" with a wrong CPU kernel computes the eager encoder's logits."""
    inject("backward")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    enc = LSPTEncoder(make_vit(), 3, 5)
    with pytest.warns(RuntimeWarning, match="failed their self-check"):
        out = enc(images)
    enc.backend = "reference"
    torch.testing.assert_close(out, enc(images), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_real_triton_kernels_pass_interpreted(dtype):
    """The Triton kernels themselves, run by the interpreter on the CPU, pass the same check (on a GPU
    they are checked by default, with the large-batch problem too)."""
    import os
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, no GPU)")
    if ops.unavailable_reason("triton"):
        pytest.skip(f"triton backend unavailable: {ops.unavailable_reason('triton')}")
    ok, reason = selfcheck.check_backend("triton", "cpu", dtype, width=16)
    assert ok and reason == "", reason


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_first_check_inside_a_checkpointed_block(autocast):
    """The first fused call of a process can come from inside a checkpointed block (and autocast): the
    check must not run under the checkpoint's saved-tensor hooks nor the caller's autocast, and the
    model's gradients must still be those of the eager encoder."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = {}
    for backend in ("cpu", "reference"):
        selfcheck.reset()
        enc = LSPTEncoder(make_vit(), 3, 5, backend=backend).set_grad_checkpointing()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = enc(images)
        grads[backend] = torch.autograd.grad(out.float().square().sum(), enc.trainable_parameters())
        if backend == "cpu":
            checked = dict(selfcheck._results)
    dtype = torch.bfloat16 if autocast else torch.float32
    assert checked == {("cpu", "cpu", dtype, 32): (True, "")}, checked
    tol = 3e-2 if autocast else 1e-5
    for g, r in zip(grads["cpu"], grads["reference"]):
        torch.testing.assert_close(g, r, atol=tol, rtol=tol)
