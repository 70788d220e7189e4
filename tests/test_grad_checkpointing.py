"""Gradient checkpointing: `encoder.set_grad_checkpointing()` or timm's `vit.set_grad_checkpointing()`.

Each block is recomputed in backward together with the step that follows it. The checkpointed model
must compute exactly what the plain one computes (logits and every trainable gradient, for every
method and LSPT variant, with prompt dropout drawing the same masks again) while keeping fewer
activations for backward.
"""
import pytest
import torch
from helpers import make_eva, make_vit

from lspt_kernels.backends import unavailable_reason
from lspt_kernels.encoders import build_encoder

NP, NC = 3, 5

CASES = {
    "linear": ("linear", {}),
    "vpt-shallow": ("vpt-shallow", {}),
    "vpt-deep": ("vpt-deep", {}),
    "gapt": ("gapt", dict(gate_init=1.0)),
    "lspt-reference": ("lspt", dict(backend="reference")),
    "lspt-cpu": ("lspt", dict(backend="cpu")),
    "lspt-kmeans": ("lspt", dict(cspc="kmeans", backend="reference")),
    "lspt-cspc-none": ("lspt", dict(cspc="none", backend="reference")),
    "lspt-gru": ("lspt", dict(lpc="gru", backend="reference")),
    "lspt-transformer": ("lspt", dict(lpc="transformer", backend="reference")),
    "lspt-none-none": ("lspt", dict(cspc="none", lpc="none", backend="reference")),
    "lspt-2layers": ("lspt", dict(lstm_layers=2, backend="reference")),
    "lspt-unshared-2layers": ("lspt", dict(shared_lstm=False, lstm_layers=2, backend="reference")),
}


def _encoder(case, vit=None, **extra):
    method, kw = CASES[case]
    if kw.get("backend") == "cpu" and unavailable_reason("cpu"):
        pytest.skip(f"cpu backend unavailable: {unavailable_reason('cpu')}")
    torch.manual_seed(0)
    enc = build_encoder(method, vit if vit is not None else make_vit(), num_prompts=NP, num_classes=NC,
                        **kw, **extra)
    with torch.no_grad():  # gates and temperatures away from their init so their gradients matter
        for name, p in enc.named_parameters():
            if name in ("temperatures", "gate_logits"):
                p.add_(torch.linspace(-0.3, 0.3, p.numel()))
    return enc


def _run(enc, images, upstream, seed=0):
    torch.manual_seed(seed)
    out = enc(images)
    params = enc.trainable_parameters()
    grads = torch.autograd.grad(out, params, upstream)
    return out.detach(), grads


def _images(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, atol=1e-6, rtol=1e-6)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_equals_plain(case):
    enc = _encoder(case)
    images = _images()
    upstream = torch.randn(2, NC, generator=torch.Generator().manual_seed(2))
    plain = _run(enc, images, upstream)
    assert not enc.grad_checkpointing
    assert enc.set_grad_checkpointing() is enc and enc.grad_checkpointing
    _assert_same(_run(enc, images, upstream), plain)


@pytest.mark.parametrize("case", ["vpt-deep", "gapt", "lspt-reference", "lspt-gru", "lspt-cpu"])
def test_prompt_dropout_replays_the_same_mask(case):
    """Dropout inside a checkpointed unit: recomputation must draw the mask of the forward again,
    so gradients equal the plain run's with the same seed (a fresh mask would change them)."""
    enc = _encoder(case, prompt_dropout=0.5).train()
    images = _images(3)
    upstream = torch.randn(3, NC, generator=torch.Generator().manual_seed(2))
    plain = _run(enc, images, upstream, seed=7)
    other_seed = _run(enc, images, upstream, seed=8)
    assert not torch.equal(plain[0], other_seed[0]), "dropout is not active in this test"
    enc.set_grad_checkpointing(True)
    _assert_same(_run(enc, images, upstream, seed=7), plain)


def test_timm_flag_is_honoured_and_switches_off():
    vit = make_vit()
    enc = _encoder("lspt-reference", vit)
    vit.set_grad_checkpointing(True)                  # timm's own switch, on the backbone
    assert enc.grad_checkpointing
    enc.set_grad_checkpointing(False)
    assert not enc.grad_checkpointing and not vit.grad_checkpointing


def _saved_bytes(enc, images) -> int:
    """Bytes of the non-parameter tensors autograd keeps for backward (each storage once),
    plus the block inputs that checkpoint keeps to recompute from."""
    params = {p.untyped_storage().data_ptr() for p in enc.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    import torch.utils.checkpoint as cp
    real = cp.checkpoint

    def counting_checkpoint(fn, *args, **kw):  # what checkpoint holds: its tensor inputs
        for a in args:
            if isinstance(a, torch.Tensor):
                seen[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()
        return real(fn, *args, **kw)

    cp.checkpoint = counting_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = enc(images)
    finally:
        cp.checkpoint = real
    out.sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("case", ["vpt-deep", "gapt", "lspt-reference", "lspt-cpu"])
def test_saved_activations_shrink(case):
    vit = make_vit(embed_dim=64, depth=4, heads=2)
    enc = _encoder(case, vit)
    images = _images(4)
    plain = _saved_bytes(enc, images)
    vit.set_grad_checkpointing(True)
    checkpointed = _saved_bytes(enc, images)
    # Plain keeps every block's internals (qkv, attention, MLP hidden 4D wide, norms); checkpointed
    # keeps one (B, T, D) input per block plus the state.
    assert checkpointed < 0.25 * plain, (checkpointed, plain)


def test_no_checkpoint_without_grad(monkeypatch):
    """Inference (no_grad) runs the plain loop: nothing to save, nothing to recompute."""
    enc = _encoder("lspt-reference").set_grad_checkpointing()
    import torch.utils.checkpoint as cp

    def fail(*a, **k):
        raise AssertionError("checkpoint called under no_grad")

    monkeypatch.setattr(cp, "checkpoint", fail)
    with torch.no_grad():
        enc(_images())


@pytest.mark.parametrize("case", ["lspt-reference", "lspt-cpu", "gapt"])
def test_checkpointed_equals_plain_under_autocast(case):
    """bf16 autocast: the recomputation runs under the same autocast state, the LSPT weights are cast
    once per forward (a cache shared by the units) and the cell is carried in fp32."""
    enc = _encoder(case)
    images = _images()
    upstream = torch.randn(2, NC, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _run(enc, images, upstream)
        enc.set_grad_checkpointing()
        _assert_same(_run(enc, images, upstream), plain)


def test_checkpointed_fused_model_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the checkpointed units (torch's checkpoint higher-order op)
    around the fused op: same logits and gradients as eager."""
    if unavailable_reason("cpu"):
        pytest.skip(f"cpu backend unavailable: {unavailable_reason('cpu')}")
    from test_compile import _check
    torch._dynamo.reset()
    _check(_encoder("lspt-cpu").set_grad_checkpointing(), "aot_eager")


def test_checkpoint_some_blocks():
    """blocks=n checkpoints the first n blocks only: same results, memory in between."""
    vit = make_vit(embed_dim=64, depth=4, heads=2)
    enc = _encoder("lspt-cpu", vit)
    images = _images(4)
    upstream = torch.randn(4, NC, generator=torch.Generator().manual_seed(2))
    plain, plain_bytes = _run(enc, images, upstream), _saved_bytes(enc, images)
    enc.set_grad_checkpointing(blocks=2)
    assert enc.grad_checkpointing and enc.checkpoint_blocks == 2
    _assert_same(_run(enc, images, upstream), plain)
    half_bytes = _saved_bytes(enc, images)
    enc.set_grad_checkpointing()
    all_bytes = _saved_bytes(enc, images)
    assert all_bytes < half_bytes < plain_bytes, (all_bytes, half_bytes, plain_bytes)


@pytest.mark.parametrize("bad", [-1, 5, 1.5, True])
def test_bad_number_of_checkpointed_blocks(bad):
    enc = _encoder("lspt-reference", make_vit(embed_dim=64, depth=4, heads=2))
    with pytest.raises(ValueError, match=r"blocks must be an int in \[0, 4\]"):
        enc.set_grad_checkpointing(blocks=bad)


@pytest.mark.parametrize("flavour", ["dinov3", "rope-mixed", "post-norm"])
@pytest.mark.parametrize("case", ["vpt-deep", "gapt", "lspt-cpu", "lspt-reference", "linear"])
def test_checkpointed_equals_plain_on_eva(flavour, case):
    """On an Eva each checkpointed unit carries its block's rope (one per block for 'mixed')."""
    enc = _encoder(case, make_eva(flavour))
    images = _images()
    upstream = torch.randn(2, NC, generator=torch.Generator().manual_seed(2))
    plain = _run(enc, images, upstream)
    enc.set_grad_checkpointing()
    _assert_same(_run(enc, images, upstream), plain)
