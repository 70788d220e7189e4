"""The encoder's fused LSPT path: the hoisted gate GEMM (one per forward), the op per block, prompt
dropout on the fused path, the host work it dispatches per step, and torch.compile over it."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import make_vit, need_backend
from test_encoders import NC, NP, _images, assert_parity
from torch.utils._python_dispatch import TorchDispatchMode

import lspt_reference as R
from lspt_kernels import LSPTEncoder, VPTEncoder
from lspt_kernels.backends import unavailable_reason


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("options", [dict(), dict(shared_lstm=False)], ids=["shared", "per-block-cells"])
def test_fused_encoder_matches_reference(small_vit, backend, options):
    """The hoisted form (gate bias for all steps before the loop, then the step op) equals the
    paper's plain per-step form in python/lspt_reference: logits and every gradient."""
    if backend == "cpu":
        need_backend("cpu")
    enc = LSPTEncoder(small_vit, NP, NC, backend=backend, **options)
    assert enc.fused
    assert_parity(enc, R.ReferenceLSPT(small_vit, NP, NC, **options), _images(small_vit))


class _Unfused(LSPTEncoder):
    """The same encoder forced onto the plain PyTorch path (nn.LSTMCell per block)."""

    fused = property(lambda self: False)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("shared_lstm", [True, False], ids=["shared", "per-block-cells"])
def test_fused_path_with_prompt_dropout(backend, shared_lstm):
    """Per-image prompt dropout runs on the fused path (no fallback) with the same masks, drawn in
    the same order, as the plain PyTorch path: same logits and gradients for the same seed."""
    if backend == "cpu":
        need_backend("cpu")
    vit = make_vit()
    fused = LSPTEncoder(vit, NP, NC, backend=backend, prompt_dropout=0.5, shared_lstm=shared_lstm).train()
    plain = LSPTEncoder(vit, NP, NC, prompt_dropout=0.5, shared_lstm=shared_lstm).train()
    plain.__class__ = _Unfused
    plain.load_state_dict(fused.state_dict())
    images = _images(vit, batch=1).expand(3, -1, -1, -1).contiguous()   # three copies of one image
    outs, grads = [], []
    for enc in (fused, plain):
        torch.manual_seed(7)
        out = enc(images)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), enc.trainable_parameters()))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # Dropout is active and per image: identical images get different logits.
    assert not torch.allclose(outs[0][0], outs[0][1])


def test_fused_encoder_under_autocast():
    """bf16 autocast on the CPU: the hoisted gate GEMM and the step run in bf16, the cell in fp32;
    the cpu backend agrees with the eager one to bf16 precision, gradients included."""
    need_backend("cpu")
    vit = make_vit()
    encs = [LSPTEncoder(vit, NP, NC, backend=b) for b in ("cpu", "eager")]
    encs[1].load_state_dict(encs[0].state_dict())
    images = _images(vit)
    outs, grads = [], []
    for enc in encs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = enc(images)
        outs.append(out.float())
        grads.append(torch.autograd.grad(out.float().square().sum(), enc.trainable_parameters()))
    scale = outs[1].abs().max()
    assert (outs[0] - outs[1]).abs().max() <= 2e-2 * scale
    for g, w in zip(*grads):
        assert (g - w).abs().max() <= 3e-2 * w.abs().max() + 1e-6


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _dispatched(enc, images) -> tuple[Counter, Counter]:
    """aten (and lspt) ops one forward and one backward dispatch."""
    with _CountOps() as fwd:
        out = enc(images)
    loss = out.sum()
    with _CountOps() as bwd:
        loss.backward()
    return fwd.ops, bwd.ops


# The budget: ops one LSPT step may dispatch beyond what VPT-deep dispatches per block (counted below
# autograd, as a TorchDispatchMode sees them). Shared gate-bias rows: forward -1 (the op, against
# VPT's select + expand), backward 0 (the op's backward, the gate-bias stand-in it is handed and the
# accumulation of its tokens gradient, against VPT's select_backward, view and sum). Per-image rows
# (prompt dropout): +1 forward, +5 backward (each step's row select and its gradient adds).
BUDGET = {False: dict(forward=-1, backward=0), True: dict(forward=1, backward=5)}


@pytest.mark.parametrize("dropout", [False, True], ids=["shared-rows", "prompt-dropout"])
def test_dispatched_ops_per_step_within_budget(dropout):
    """The host path of a fused step, as a deterministic count: the per-forward work (gate GEMM,
    checks, backend) must not be repeated per block, and the op's autograd adds no op of its own
    (it is C++: a Python autograd.Function's output detaches would show up here). Counted as the
    slope over depth (3 vs 5 blocks) of LSPT minus VPT-deep, so the per-forward constant drops out."""
    need_backend("cpu")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    p = 0.5 if dropout else 0.0
    per_step = {}
    for phase, name in enumerate(("forward", "backward")):
        extra = {}
        for depth in (3, 5):
            lspt = LSPTEncoder(make_vit(depth=depth), NP, NC, backend="cpu", prompt_dropout=p).train()
            vpt = VPTEncoder(make_vit(depth=depth), NP, NC, prompt_dropout=p).train()
            _dispatched(lspt, images), _dispatched(vpt, images)    # warm-up (lazy loads, self-check)
            extra[depth] = (sum(_dispatched(lspt, images)[phase].values())
                            - sum(_dispatched(vpt, images)[phase].values()))
        per_step[name] = (extra[5] - extra[3]) / 2
        assert per_step[name] <= BUDGET[dropout][name], \
            f"{name}: {per_step[name]} ops per LSPT step beyond VPT-deep (budget {BUDGET[dropout][name]})"
    # The op runs once per step forward and backward: the counter sees it.
    fwd, bwd = _dispatched(LSPTEncoder(make_vit(depth=3), NP, NC, backend="cpu"), images)
    assert fwd["lspt.step_fwd.default"] == 2 and bwd["lspt.step_bwd.default"] == 2


def _train_steps(model, compiled, steps=3, dropout=False):
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = torch.randn(2, 3, 32, 32, generator=gen)
        loss = compiled(images).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["no-dropout", "dropout"])
def test_compiled_fused_step_no_graph_breaks_no_recompiles(dropout):
    """torch.compile(fullgraph=True) over the fused encoder: one graph, compiled once, across training
    steps whose parameters change (aot_eager traces forward and backward like inductor does)."""
    need_backend("cpu")
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = LSPTEncoder(make_vit(), NP, NC, backend="cpu", prompt_dropout=dropout).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    _train_steps(model, compiled)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times over 3 steps"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (mode='reduce-overhead') need a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_reduce_overhead_on_gpu(backend):
    """mode='reduce-overhead' (CUDA graphs): the op path has no host syncs or data-dependent host
    logic, so the graphs capture; same logits as eager."""
    why = unavailable_reason(backend)
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    torch._dynamo.reset()
    model = LSPTEncoder(make_vit(), NP, NC, backend=backend).cuda().eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    images = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            out = compiled(images)
        torch.testing.assert_close(out, model(images), atol=1e-4, rtol=1e-4)
