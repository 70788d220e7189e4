"""torch.compile(encoder, fullgraph=True): no graph breaks, same logits and gradients as eager."""
import pytest
import torch
from helpers import make_vit

from lspt_kernels import AdapterEncoder, GaPTEncoder, LSPTEncoder, VPTEncoder
from lspt_kernels.backends import unavailable_reason


def _check(model, compile_backend, atol=1e-5):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    out = compiled(images)
    expected = model(images)
    torch.testing.assert_close(out, expected, atol=atol, rtol=atol)
    params = model.trainable_parameters()
    grads = torch.autograd.grad(out.square().sum(), params)
    ref = torch.autograd.grad(expected.square().sum(), params)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=atol, rtol=atol)


def test_lspt_fused_step_compiles_with_inductor():
    """The product path: the registered op inside the compiled block loop (inductor)."""
    if unavailable_reason("cpu"):
        pytest.skip(f"cpu backend unavailable: {unavailable_reason('cpu')}")
    torch._dynamo.reset()
    _check(LSPTEncoder(make_vit(), 3, 5, backend="cpu"), "inductor")


@pytest.mark.parametrize("make", [
    lambda v: LSPTEncoder(v, 3, 5, backend="reference"),
    lambda v: LSPTEncoder(v, 3, 5, cspc="kmeans", lpc="gru", backend="reference"),
    lambda v: GaPTEncoder(v, 3, 5),
    lambda v: VPTEncoder(v, 3, 5, deep=True),
    lambda v: AdapterEncoder(v, 5, adapter_init="zero-up"),
], ids=["lspt-reference", "lspt-kmeans-gru", "gapt", "vpt-deep", "adapter"])
def test_encoders_trace_without_graph_breaks(make):
    # aot_eager traces forward and backward graphs like inductor does, without its C++ compile time.
    torch._dynamo.reset()
    _check(make(make_vit()), "aot_eager")
