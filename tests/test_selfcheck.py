"""Self-checking fused kernels (lspt_kernels/selfcheck.py), exercised on the CPU.

The GPU backends are checked by default; LSPT_SELFCHECK=all checks every fused backend, which is how
these tests run the whole mechanism without a GPU: the Triton kernels run in the interpreter
(TRITON_INTERPRET=1) and are reached through the dispatcher like on a GPU, so a deliberately wrong
launcher (forward or backward perturbed, or one that raises) swapped in for `triton_kernels.forward`
/ `backward` is what the op runs. The check must catch it in the configuration the caller runs
(gate-bias rows shared or per image, k, token layout, fp32 matmul precision), fall back to the
eager step with one warning (or raise under LSPT_SELFCHECK=strict), run once per configuration,
and never let an unchecked or failed backend into a compiled or captured graph.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_vit, need_backend
from test_step import TINY, make_inputs

from lspt_kernels import LSPTEncoder, backends, ops, selfcheck
from lspt_kernels.eager import lspt_step_eager
from lspt_kernels.ops import lspt_step

K = TINY[4]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.setenv("LSPT_SELFCHECK", "all")
    selfcheck.reset()
    yield
    selfcheck.reset()


@pytest.fixture
def fp32_precision():
    """Restores torch's fp32 matmul precision (the new per-backend API) after the test."""
    before = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
              torch.backends.mkldnn.matmul.fp32_precision)
    yield
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision, \
        torch.backends.mkldnn.matmul.fp32_precision = before


def _need(backend):
    need_backend(backend)
    if backend == "triton" and (torch.cuda.is_available() or not backends.triton_interpreted()):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, no GPU)")


class Injected:
    """The real Triton launchers with one fault where `when(tokens=, gate_bias=, k=)` holds (tokens is
    None in backward); counts the forward calls."""

    def __init__(self, fault, when=lambda **call: True):
        from lspt_kernels import triton_kernels
        self.real_forward, self.real_backward = triton_kernels.forward, triton_kernels.backward
        self.fault, self.when, self.forward_calls = fault, when, 0

    def forward(self, *args):
        self.forward_calls += 1
        hidden, new_cell, xhat, gates = self.real_forward(*args)
        if self.when(tokens=args[0], gate_bias=args[2], k=args[4]):
            if self.fault == "raise":
                raise RuntimeError("no kernel image is available for execution on the device")
            if self.fault == "forward":
                hidden = hidden + 0.05
        return hidden, new_cell, xhat, gates

    def backward(self, *args):
        grads = list(self.real_backward(*args))
        if self.fault == "backward" and self.when(tokens=None, gate_bias=args[4], k=args[7]):
            grads[3] = grads[3] * 1.1     # grad_weight_hh (grad_tokens, grad_cell, grad_gate_bias, grad_weight_hh)
        return tuple(grads)


@pytest.fixture
def inject(monkeypatch):
    _need("triton")
    from lspt_kernels import triton_kernels

    def make(fault, when=lambda **call: True):
        bad = Injected(fault, when)
        monkeypatch.setattr(triton_kernels, "forward", bad.forward)
        monkeypatch.setattr(triton_kernels, "backward", bad.backward)
        return bad
    return make


def _step(inputs, backend="triton", k=K):
    return lspt_step(*inputs, num_prefix_tokens=k, backend=backend)


def _case(backend="cpu", dtype=torch.float32, *, tokens=None, cell=None, width=16, k=1, per_image=False,
          layout="contiguous"):
    return selfcheck.make_case(backend, CPU, tokens or dtype, cell or dtype, dtype, width, k, per_image, layout)


def _recorded() -> list[selfcheck.StepCase]:
    return [case for (_, case) in selfcheck._results]


# ------------------------------------------------------------------------------------------------
# The check itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    dict(dtype=torch.float32), dict(dtype=torch.float64), dict(dtype=torch.float16), dict(dtype=torch.bfloat16),
    dict(dtype=torch.bfloat16, tokens=torch.float32, cell=torch.float32),          # autocast
    dict(dtype=torch.float16, cell=torch.float32),                                  # fp32 cell state
    dict(per_image=True, k=0, width=24), dict(layout="strided", k=5), dict(layout="unaligned", width=13),
], ids=["fp32", "fp64", "fp16", "bf16", "autocast-bf16", "fp16-cell32", "per-image-k0", "strided-k5", "unaligned"])
def test_real_cpu_kernels_pass(case):
    _need("cpu")
    ok, reason = selfcheck.check_backend("cpu", _case(**case), ops.fused_step)
    assert ok and reason == "", reason


@pytest.mark.parametrize("dtype, width", [(torch.float32, 16), (torch.float16, 16), (torch.float32, 96),
                                          (torch.float16, 96)])
def test_real_triton_kernels_pass_interpreted(dtype, width):
    """The Triton kernels themselves, run by the interpreter, pass the same check (on a GPU they are
    checked by default, with the large-batch problem too), at a test width and at a ViT-like one."""
    _need("triton")
    ok, reason = selfcheck.check_backend("triton", _case("triton", dtype, width=width, per_image=True),
                                         ops.fused_step)
    assert ok and reason == "", reason


@pytest.mark.parametrize("fault, culprit", [("forward", "hidden is off"), ("backward", "grad_weight_hh is off"),
                                            ("raise", "it raised RuntimeError: no kernel image")])
def test_wrong_kernel_is_caught_and_falls_back_with_one_warning(inject, fault, culprit):
    bad = inject(fault)
    inputs = make_inputs(TINY)
    with pytest.warns(RuntimeWarning, match=rf"'triton' step kernels failed their self-check.*{culprit}.*"
                                            r"using the 'eager' step") as record:
        hidden, new_cell = _step(inputs)
    assert len([w for w in record if "self-check" in str(w.message)]) == 1
    want = lspt_step_eager(*inputs, num_prefix_tokens=K)
    torch.testing.assert_close(hidden, want[0], atol=0, rtol=0)   # the eager step ran, exactly
    # Later calls: no second check, no second warning, still the eager step.
    calls = bad.forward_calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hidden2, _ = _step(inputs)
    assert bad.forward_calls == calls
    torch.testing.assert_close(hidden2, want[0], atol=0, rtol=0)


def test_strict_makes_a_failure_an_error(inject, monkeypatch):
    inject("forward")
    monkeypatch.setenv("LSPT_SELFCHECK", "all,strict")
    with pytest.raises(RuntimeError, match=r"self-check: the 'triton' step kernels disagree.*hidden is off"):
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
    torch.testing.assert_close(hidden, lspt_step_eager(*inputs, num_prefix_tokens=K)[0] + 0.05)


def test_cpu_tensors_are_not_checked_by_default(inject, monkeypatch):
    """Default: only GPU backends on CUDA tensors check themselves (the CPU ones are covered by tests)."""
    bad = inject("forward")
    monkeypatch.delenv("LSPT_SELFCHECK")
    _step(make_inputs(TINY))
    _need("cpu")
    _step(make_inputs(TINY), backend="cpu")
    assert bad.forward_calls == 1 and not selfcheck._results


# ------------------------------------------------------------------------------------------------
# What is checked: the configuration the caller runs, once each
# ------------------------------------------------------------------------------------------------
def test_one_check_per_configuration():
    """The cache key is the whole configuration: dtype, width, k, gate-bias rows, layout; repeats of
    one configuration run no second check."""
    _need("cpu")
    for _ in range(3):
        _step(make_inputs(TINY), backend="cpu")
    assert len(selfcheck._results) == 1
    _step(make_inputs(TINY, torch.float64), backend="cpu")
    _step(make_inputs((2, 3, 5, 24, 1)), backend="cpu")                        # another width
    _step(make_inputs((2, 3, 5, 16, 0)), backend="cpu", k=0)                    # another k
    tokens, *rest = make_inputs(TINY)
    unaligned = torch.empty(tokens.numel() + 1)[1:].view(tokens.shape)
    unaligned.copy_(tokens.detach())
    _step((unaligned, *rest), backend="cpu")                                    # another layout
    cases = _recorded()
    assert len(cases) == 5 and all(ok for ok, _ in selfcheck._results.values())
    assert {(c.tokens_dtype, c.width, c.num_prefix_tokens, c.layout) for c in cases} == {
        (torch.float32, 16, 1, "contiguous"), (torch.float64, 16, 1, "contiguous"),
        (torch.float32, 24, 1, "contiguous"), (torch.float32, 16, 0, "contiguous"),
        (torch.float32, 16, 1, "unaligned")}


@pytest.mark.parametrize("training", [True, False], ids=["train-dropout", "eval"])
def test_encoder_checks_what_it_runs(training):
    """The encoder's own configuration is checked: its k (CLS + 4 registers), its layout, and under
    prompt dropout (the recipe's default) per-image gate-bias rows."""
    _need("cpu")
    vit = make_vit(embed_dim=24, depth=3, heads=3, reg_tokens=4, img=24)
    enc = LSPTEncoder(vit, 2, 3, backend="cpu", prompt_dropout=0.1).train(training)
    out = enc(torch.randn(2, 3, 24, 24))
    if training:
        out.sum().backward()
    (case,) = _recorded()
    assert (case.width, case.num_prefix_tokens, case.per_image_rows, case.layout) == (24, 5, training, "contiguous")


# Kernels right in the configuration the check used to run (shared rows, k = 1, aligned contiguous
# tokens), wrong in one that training or a caller runs.
FAULTS_ONLY_IN = {
    "per-image-rows": lambda gate_bias, **call: gate_bias.dim() == 3,
    "k0": lambda k, **call: k == 0,
    "unaligned": lambda tokens, **call: tokens is not None and tokens.storage_offset() % 4 != 0,
}


@pytest.mark.parametrize("where", ["k0", "unaligned"])
def test_fault_in_the_callers_configuration_is_caught(inject, where):
    inject("forward", FAULTS_ONLY_IN[where])
    B, n_p, N, D, k = TINY
    k = 0 if where == "k0" else k
    tokens, *rest = make_inputs((B, n_p, N, D, k))
    if where == "unaligned":
        tokens = torch.zeros(tokens.numel() + 1)[1:].view(tokens.shape).copy_(tokens.detach())
    with pytest.warns(RuntimeWarning, match="failed their self-check"):
        hidden, _ = _step((tokens, *rest), k=k)
    torch.testing.assert_close(hidden, lspt_step_eager(tokens, *rest, num_prefix_tokens=k)[0], atol=0, rtol=0)


def test_encoder_with_prompt_dropout_falls_back_as_a_whole(inject):
    """A kernel wrong only for per-image rows: an LSPT encoder trained with prompt dropout computes the
    eager encoder's logits and gradients."""
    inject("backward", FAULTS_ONLY_IN["per-image-rows"])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    enc = LSPTEncoder(make_vit(embed_dim=16), 2, 3, backend="triton", prompt_dropout=0.3).train()
    grads = []
    for backend in ("triton", "eager"):
        enc.backend = backend
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = enc(images)
        grads.append(torch.autograd.grad(out.square().sum(), enc.trainable_parameters()))
        if backend == "triton":
            assert any("failed their self-check" in str(w.message) for w in record)
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# fp32 matmul precision: torch's two APIs, and part of the key
# ------------------------------------------------------------------------------------------------
def test_new_precision_api_reproduced(fp32_precision):
    """torch.get_float32_matmul_precision() raises once the per-backend API was used (torch >= 2.9);
    precision.float32_matmul_precision reads both."""
    from lspt_kernels.precision import float32_matmul_precision
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has only the legacy API")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.get_float32_matmul_precision()
    assert float32_matmul_precision("cuda") == "tf32" and float32_matmul_precision("cpu") == "ieee"
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.set_float32_matmul_precision("medium")
    assert float32_matmul_precision("cuda") == "tf32" and float32_matmul_precision("cpu") == "bf16"


def test_triton_fp32_under_the_new_precision_api(fp32_precision, monkeypatch):
    """With cuBLAS' fp32 precision set through the new API, Triton's fp32 step still checks itself and
    runs (it used to fail with torch's "mix of the legacy and new APIs" and fall back), and a switch
    of the precision is a new configuration, checked again."""
    _need("triton")
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has only the legacy API")
    inputs = make_inputs(TINY)
    want = lspt_step_eager(*inputs, num_prefix_tokens=K)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(inputs)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        hidden, _ = _step(inputs)
    torch.testing.assert_close(hidden, want[0], atol=5e-3, rtol=5e-3)
    assert sorted(c.precision for c in _recorded()) == ["ieee", "tf32"]
    monkeypatch.setenv("LSPT_SELFCHECK", "0")       # the forward itself reads the precision too
    _step(inputs)


# ------------------------------------------------------------------------------------------------
# Never inside a trace or a capture
# ------------------------------------------------------------------------------------------------
def _compiled_step(backend="triton"):
    torch._dynamo.reset()
    return torch.compile(lambda *a: lspt_step(*a, num_prefix_tokens=K, backend=backend), fullgraph=True,
                         backend="aot_eager")


def test_recorded_failure_holds_in_a_compiled_graph(inject):
    """A backend that failed its check in eager mode never reaches a torch.compile graph."""
    bad = inject("forward")
    inputs = make_inputs(TINY)
    with pytest.warns(RuntimeWarning, match="failed their self-check"):
        _step(inputs)
    calls = bad.forward_calls
    hidden, _ = _compiled_step()(*inputs)
    torch.testing.assert_close(hidden, lspt_step_eager(*inputs, num_prefix_tokens=K)[0], atol=0, rtol=0)
    assert bad.forward_calls == calls


def test_model_only_ever_run_compiled_is_checked(inject):
    """The first call is compiled: the check runs at trace time (outside the graph) and the graph
    holds the step that passed."""
    inject("forward")
    inputs = make_inputs(TINY)
    with pytest.warns(RuntimeWarning, match="failed their self-check"):
        hidden, _ = _compiled_step()(*inputs)
    torch.testing.assert_close(hidden, lspt_step_eager(*inputs, num_prefix_tokens=K)[0], atol=0, rtol=0)
    assert len(_recorded()) == 1


def test_check_is_invisible_to_dispatch_modes():
    """A make_fx / export trace or a user's dispatch mode (here FlopCounterMode) around the first
    call does not see the check's own work."""
    _need("cpu")
    from torch.utils.flop_counter import FlopCounterMode
    B, n_p, _, D, _ = TINY
    with FlopCounterMode(display=False) as counter:
        _step([t.detach() for t in make_inputs(TINY)], backend="cpu")
    assert len(_recorded()) == 1
    assert counter.get_total_flops() == 8 * B * n_p * D * D + 8 * n_p * D * D


def test_graph_capture_uses_the_record_or_the_eager_step(monkeypatch):
    """Inside a CUDA graph capture the check cannot run: a recorded choice is used; without one the
    eager step is captured (one warning), and nothing is recorded."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setenv("LSPT_SELFCHECK", "1")
    case = selfcheck.make_case("cuda", torch.device("cuda"), torch.float32, torch.float32, torch.float32, 16, 1,
                               False, "contiguous")

    def never(*args):
        raise AssertionError("the check must not run during a capture")

    with pytest.warns(RuntimeWarning, match="CUDA graph is being captured"):
        assert selfcheck.ensure("cuda", case, never) == "eager"
    assert not selfcheck._chosen
    selfcheck._chosen[("cuda", case)] = "triton"      # what an earlier eager forward decided
    assert selfcheck.ensure("cuda", case, never) == "triton"


# ------------------------------------------------------------------------------------------------
# The caller's state
# ------------------------------------------------------------------------------------------------
def test_check_leaves_the_caller_alone():
    """No global RNG draw, and it runs under no_grad / inference_mode (where models are evaluated)."""
    _need("cpu")
    state = torch.get_rng_state()
    with torch.inference_mode():
        hidden, _ = _step([t.detach() for t in make_inputs(TINY)], backend="cpu")
    assert list(selfcheck._results.values()) == [(True, "")]
    assert torch.equal(torch.get_rng_state(), state)
    assert not hidden.requires_grad


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_first_check_inside_a_checkpointed_block(autocast):
    """The first fused call of a process can come from inside a checkpointed block (and autocast): the
    check must not run under the checkpoint's saved-tensor hooks nor the caller's autocast, and the
    model's gradients must still be those of the eager encoder."""
    _need("cpu")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = {}
    for backend in ("cpu", "eager"):
        selfcheck.reset()
        enc = LSPTEncoder(make_vit(), 3, 5, backend=backend).set_grad_checkpointing()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = enc(images)
        grads[backend] = torch.autograd.grad(out.float().square().sum(), enc.trainable_parameters())
        if backend == "cpu":
            checked = dict(selfcheck._results)
    (key, result), = checked.items()
    assert result == (True, "") and key[1].weight_dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = 3e-2 if autocast else 1e-5
    for g, r in zip(grads["cpu"], grads["eager"]):
        torch.testing.assert_close(g, r, atol=tol, rtol=tol)
