"""SPT initialisation: each prompt is drawn from the frozen backbone's tokens at the right layer."""
import pytest
import torch
import torch.nn.functional as F
from helpers import make_vit

from lspt_kernels import init_prompts_from_data
from lspt_kernels.encoders import build_encoder

NP = 4


def _images(n=6, seed=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _block_inputs(vit, images):
    """Patch tokens entering each block of the backbone run without prompts: L x (B, N, D)."""
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        out = []
        for block in vit.blocks:
            out.append(x[:, vit.num_prefix_tokens:])
            x = block(x)
    return out


def _prompt_sets(enc):
    P = enc.prompts.detach()
    return list(P) if P.dim() == 3 else [P]


def _nearest(prompts, tokens):
    """Max-abs distance of each prompt (Np, D) to its nearest row of tokens (M, D)."""
    return (prompts[:, None] - tokens[None]).abs().amax(-1).min(1).values


@pytest.mark.parametrize("method", ["vpt-deep", "lspt", "vpt-shallow", "gapt"])
def test_tokens_are_real_tokens_of_the_right_layer(method):
    vit, images = make_vit(), _images()
    enc = build_encoder(method, vit, num_prompts=NP, num_classes=3)
    init_prompts_from_data(enc, images, how="tokens", seed=0)
    inputs = [t.reshape(-1, t.shape[-1]) for t in _block_inputs(vit, images)]
    sets = _prompt_sets(enc)
    assert len(sets) == (3 if method in ("vpt-deep", "lspt") else 1)
    for l, P in enumerate(sets):
        assert _nearest(P, inputs[l]).max() < 1e-5, f"layer {l}: a prompt is not a token of block {l}'s input"
        others = [inputs[j] for j in range(len(inputs)) if j != l]
        assert all(_nearest(P, t).min() > 1e-3 for t in others), f"layer {l}: prompts match another layer"
        assert len({tuple(r.tolist()) for r in P}) == NP                       # distinct tokens


@pytest.mark.parametrize("method", ["vpt-deep", "gapt"])
def test_kmeans_prompts_are_centroids(method):
    vit, images = make_vit(), _images()
    enc = build_encoder(method, vit, num_prompts=NP, num_classes=3)
    init_prompts_from_data(enc, images, how="kmeans", seed=1, tokens_per_image=None)   # every token
    inputs = [t.reshape(-1, t.shape[-1]) for t in _block_inputs(vit, images)]
    for l, P in enumerate(_prompt_sets(enc)):
        assign = torch.cdist(inputs[l], P, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
        members = [inputs[l][assign == j] for j in range(NP)]
        assert sum(len(m) > 0 for m in members) >= NP - 1
        for j, m in enumerate(members):
            if len(m):
                torch.testing.assert_close(P[j], m.mean(0), atol=1e-5, rtol=1e-5)
            else:   # an empty cluster keeps its seed: a real token
                assert _nearest(P[j:j + 1], inputs[l]).item() < 1e-5


def test_pool_prompts_are_window_means():
    vit, images = make_vit(), _images()                     # 4 x 4 patch grid, 2 x 2 windows
    enc = build_encoder("lspt", vit, num_prompts=NP, num_classes=3)
    init_prompts_from_data(enc, images, how="pool", seed=2, window=2)
    for l, (P, t) in enumerate(zip(_prompt_sets(enc), _block_inputs(vit, images))):
        B, N, D = t.shape
        windows = F.avg_pool2d(t.transpose(1, 2).reshape(B, D, 4, 4), 2).flatten(2).transpose(1, 2).reshape(-1, D)
        assert _nearest(P, windows).max() < 1e-5, f"layer {l}"
        assert _nearest(P, t.reshape(-1, D)).min() > 1e-4          # a mean, not a single token


def test_deterministic_and_loader_input():
    vit, images = make_vit(), _images(8)
    a = build_encoder("vpt-deep", vit, num_prompts=NP, num_classes=3)
    b = build_encoder("vpt-deep", vit, num_prompts=NP, num_classes=3)
    init_prompts_from_data(a, images, how="kmeans", seed=5)
    loader = [(images[:3], torch.zeros(3)), (images[3:], torch.zeros(5))]       # DataLoader-like batches
    init_prompts_from_data(b, loader, how="kmeans", seed=5)
    assert torch.equal(a.prompts, b.prompts)
    init_prompts_from_data(b, images, how="kmeans", seed=6)
    assert not torch.equal(a.prompts, b.prompts)
    # num_images caps the sample: the first 3 images only.
    init_prompts_from_data(a, images[:3], seed=0)
    init_prompts_from_data(b, loader, seed=0, num_images=3)
    assert torch.equal(a.prompts, b.prompts)
    assert b.training                                   # the encoder's mode is restored


def test_bad_input():
    vit = make_vit()
    for method in ("linear", "adapter"):
        with pytest.raises(ValueError, match=f"the '{method}' encoder has no prompts"):
            init_prompts_from_data(build_encoder(method, vit, num_classes=3), _images())
    enc = build_encoder("lspt", vit, num_prompts=NP, num_classes=3)
    with pytest.raises(ValueError, match=r"how must be one of \('tokens', 'kmeans', 'pool'\)"):
        init_prompts_from_data(enc, _images(), how="random")
    with pytest.raises(ValueError, match="3 candidate tokens at layer 0 for 4 prompts: give more images"):
        init_prompts_from_data(enc, _images(3), tokens_per_image=1)
    with pytest.raises(TypeError, match="batch 0 is str"):
        init_prompts_from_data(enc, ["not images"])
    with pytest.raises(ValueError, match="images must have 3 channels"):
        init_prompts_from_data(enc, torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="gave no images"):
        init_prompts_from_data(enc, [])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_images_get_the_forward_pass_rule(dtype):
    enc = build_encoder("vpt-deep", make_vit(), num_prompts=NP, num_classes=3)
    images = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(dtype)
    before = enc.prompts.detach().clone()
    with pytest.raises(TypeError, match=rf"images must be a floating-point tensor, got {dtype}") as forward:
        enc(images)
    with pytest.raises(TypeError) as init:
        init_prompts_from_data(enc, images, tokens_per_image=None)
    assert str(init.value) == str(forward.value) and torch.equal(enc.prompts, before)


def test_empty_batches_add_no_images():
    enc = build_encoder("vpt-deep", make_vit(), num_prompts=NP, num_classes=3)
    with pytest.raises(ValueError, match="images_or_loader gave no images"):
        init_prompts_from_data(enc, torch.zeros(0, 3, 32, 32))
    a = build_encoder("vpt-deep", make_vit(), num_prompts=NP, num_classes=3)
    init_prompts_from_data(a, [torch.zeros(0, 3, 32, 32), _images()], seed=1)
    init_prompts_from_data(enc, _images(), seed=1)
    assert torch.equal(a.prompts, enc.prompts)
