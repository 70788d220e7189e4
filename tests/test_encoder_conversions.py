"""What users do to a whole encoder: wrap a ViT that is `.double()` or on the meta device (the encoder's
own parameters follow the backbone's dtype and device), and `torch.jit.trace` it (the fused LSPT step
refuses, naming the supported paths; the other encoders trace)."""
import pytest
import torch
from helpers import make_vit, vit_images

from lspt_kernels.encoders import METHODS, build_encoder

NP, NC = 2, 3
LSPT_VARIANTS = [dict(lpc="gru"), dict(lpc="transformer"), dict(lstm_layers=2), dict(shared_lstm=False)]


def _enc(method, vit, **kw):
    kw = dict(num_prompts=NP, **kw) if method not in ("linear", "adapter") else kw
    return build_encoder(method, vit, num_classes=NC, **kw)


@pytest.mark.parametrize("method, kw", [(m, {}) for m in sorted(METHODS)] + [("lspt", v) for v in LSPT_VARIANTS])
def test_encoder_follows_a_double_backbone(method, kw):
    enc32, enc64 = _enc(method, make_vit(), **kw), _enc(method, make_vit().double(), **kw)
    assert {p.dtype for p in enc64.parameters()} == {torch.float64}
    # Made in fp32 on the CPU, then cast: the same initial values as the fp32 encoder's.
    for (name, a), b in zip(enc32.tuned_state_dict().items(), enc64.tuned_state_dict().values()):
        assert torch.equal(a.double(), b), name
    images = vit_images(enc32.vit)
    with torch.no_grad():
        out = enc64.eval()(images.double())
        expected = enc32.eval()(images)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, kw", [(m, {}) for m in sorted(METHODS)] + [("lspt", v) for v in LSPT_VARIANTS])
def test_encoder_follows_a_meta_backbone(method, kw):
    enc = _enc(method, make_vit().to("meta"), **kw)
    assert all(p.is_meta for p in enc.parameters())
    out = enc.eval()(torch.empty(2, 3, 32, 32, device="meta"))
    assert out.is_meta and out.shape == (2, NC)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("entry", ["forward", "forward_intermediates"])
def test_jit_trace_of_the_fused_lspt_step_names_the_supported_paths(entry):
    enc = _enc("lspt", make_vit()).eval()
    fn = enc if entry == "forward" else (lambda images: enc.forward_intermediates(images, intermediates_only=True))
    with pytest.raises(RuntimeError, match=r"torch.jit.trace does not support LSPT's fused step: use torch.export or "
                                           r"torch.compile \(both supported\), or build the encoder with "
                                           r"backend='eager'"):
        torch.jit.trace(fn, vit_images(enc.vit))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("method, kw", [("lspt", dict(backend="eager")), ("gapt", {}), ("vpt-deep", {})])
def test_jit_trace_of_the_other_encoders(method, kw):
    enc = _enc(method, make_vit(), **kw).eval()
    traced = torch.jit.trace(enc, vit_images(enc.vit))
    images = vit_images(enc.vit, batch=3) + 1
    with torch.no_grad():
        torch.testing.assert_close(traced(images), enc(images), atol=1e-5, rtol=1e-5)
