"""Images of another float dtype than the model (fp64 from numpy, fp16/bf16 from a loader): cast to
the patch embedding's weight dtype, left to autocast where it casts them itself (README "Bad input")."""
import pytest
import torch
from helpers import make_vit

from lspt_kernels.encoders import METHODS, _images_in_model_dtype, build_encoder

NP, NC = 2, 3


def _enc(method, vit=None, **kw):
    return build_encoder(method, vit if vit is not None else make_vit(), num_prompts=NP, num_classes=NC, **kw)


def _images(batch=2, dtype=torch.float32):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_of_another_float_dtype_are_cast_to_the_model(method, dtype):
    enc = _enc(method).eval()
    images = _images(dtype=dtype)
    with torch.no_grad():
        out = enc(images)
        expected = enc(images.float())      # the same values, cast by the caller
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_timm_alone_fails_on_such_images():
    # Why the cast is there: the timm model itself does not cast (if timm starts to, this tells us).
    with pytest.raises(RuntimeError):
        make_vit()(_images(dtype=torch.float64))


def test_images_cast_up_for_a_double_model():
    enc = _enc("lspt", make_vit().double()).double().eval()
    images = _images()
    with torch.no_grad():
        out = enc(images)
        expected = enc(images.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_image_cast_copies_nothing_when_dtypes_match_and_leaves_autocast_alone():
    w = torch.zeros(1)
    x = torch.randn(2)
    assert _images_in_model_dtype(x, w) is x
    x64 = x.double()
    assert _images_in_model_dtype(x64, w).dtype == torch.float32
    x16 = x.half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _images_in_model_dtype(x16, w) is x16          # autocast casts fp16 itself
        assert _images_in_model_dtype(x64, w).dtype == torch.float32   # but never fp64


@pytest.mark.parametrize("method", ["vpt-deep", "lspt"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_under_autocast(method, dtype):
    enc = _enc(method).eval()
    images = _images(dtype=torch.bfloat16).float()      # values exact in every dtype tested
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(images.to(dtype))
        expected = enc(images)
    # autocast runs the patch-embed convolution in bf16 whatever the input float dtype: same result.
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_image_cast_traces_without_graph_breaks():
    torch._dynamo.reset()
    enc = _enc("vpt-deep").eval()
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images.double()), enc(images), atol=1e-5, rtol=1e-5)
