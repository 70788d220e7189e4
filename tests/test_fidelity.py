"""The official GaPT/VPT behaviours, each against a plain restatement of it (docs/method.md):
GaPT's temperature projection, per-image prompt dropout, the official head init, MAE pooling."""
import math

import pytest
import torch
from helpers import make_vit

import lspt_reference as R
from lspt_kernels import GaPTEncoder, LSPTEncoder, VPTEncoder, from_timm
from lspt_kernels.encoders import METHODS, build_encoder

NP, NC = 3, 5


def _images(vit, batch=2, seed=1):
    return torch.randn(batch, 3, *vit.patch_embed.img_size, generator=torch.Generator().manual_seed(seed))


def _grads(model, images, names, upstream):
    out = model(images)
    params = dict(model.named_parameters())
    return out, dict(zip(names, torch.autograd.grad(out, [params[n] for n in names], upstream)))


# --- GaPT temperature: a projection of the parameter, not a clamp inside the graph ------------------
def test_temperature_gradient_flows_at_and_beyond_the_bounds():
    vit = make_vit()
    enc = GaPTEncoder(vit, NP, NC, gate_init=1.0)
    with torch.no_grad():
        enc.temperatures.copy_(torch.tensor([25.0, 10.0, 1e-4]))     # beyond, at, beyond
    # The projected formulation: the same model whose temperatures already sit at the projected values.
    projected = GaPTEncoder(vit, NP, NC, gate_init=1.0)
    projected.load_state_dict(enc.state_dict())
    with torch.no_grad():
        projected.temperatures.copy_(torch.tensor([10.0, 10.0, 0.01]))
    images, names = _images(vit), ["temperatures", "gate_logits", "prompts", "head.weight"]
    upstream = torch.randn(2, NC, generator=torch.Generator().manual_seed(2))
    out, g = _grads(enc, images, names, upstream)
    assert torch.equal(enc.temperatures.detach(), torch.tensor([10.0, 10.0, 0.01]))   # projected in place
    assert torch.all(g["temperatures"] != 0), g["temperatures"]
    out_p, g_p = _grads(projected, images, names, upstream)
    torch.testing.assert_close(out, out_p, atol=0, rtol=0)
    for n in names:
        torch.testing.assert_close(g[n], g_p[n], atol=0, rtol=0)
    # The reference restates the official code (reinit_temp, then temp used as is) and agrees.
    ref = R.ReferenceGaPT(vit, NP, NC, gate_init=1.0)
    ref.load_state_dict({k: v for k, v in enc.state_dict().items() if not k.startswith("vit.")}, strict=False)
    with torch.no_grad():
        ref.temperatures.copy_(torch.tensor([25.0, 10.0, 1e-4]))
    out_r, g_r = _grads(ref, images, names, upstream)
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g["temperatures"], g_r["temperatures"], atol=1e-5, rtol=1e-5)
    # Why a projection: a clamp inside the graph cuts these gradients to exactly zero at/beyond a bound.
    t = torch.tensor([25.0, 10.0, 1e-4], requires_grad=True)
    t.clamp(0.01, 10.0).sum().backward()
    assert t.grad[0] == 0 and t.grad[2] == 0


def test_temperature_can_come_back_inside():
    enc = GaPTEncoder(make_vit(), NP, NC)
    with torch.no_grad():
        enc.temperatures.fill_(50.0)
    images = _images(enc.vit)
    g, = torch.autograd.grad((enc(images) ** 2).sum(), [enc.temperatures])
    assert torch.all(g != 0)
    sign = 1.0 if g[0] > 0 else -1.0            # a loss whose gradient points the first one inward
    opt = torch.optim.SGD([enc.temperatures], lr=1.0)
    (sign * (enc(images) ** 2).sum()).backward()
    step = enc.temperatures.grad.clone()
    assert step[0] > 0
    opt.step()
    expected = (10.0 - step).clamp(0.01, 10.0)
    assert expected[0] < 10.0                    # back inside the box
    enc(images)                                  # the next forward projects again: keeps it
    torch.testing.assert_close(enc.temperatures.detach(), expected)


def test_two_forwards_one_backward():
    """A plain training loop with two views per step: the projection must not invalidate the first graph."""
    enc = GaPTEncoder(make_vit(), NP, NC)
    images = _images(enc.vit)
    loss = enc(images).sum() + enc(images.flip(-1)).sum()
    loss.backward()
    assert enc.temperatures.grad is not None and torch.all(enc.temperatures.grad != 0)


def test_temperature_projection_under_torch_compile():
    torch._dynamo.reset()
    vit = make_vit()
    enc = GaPTEncoder(vit, NP, NC, gate_init=1.0)
    eager = GaPTEncoder(vit, NP, NC, gate_init=1.0)
    eager.load_state_dict(enc.state_dict())
    for m in (enc, eager):
        with torch.no_grad():
            m.temperatures.copy_(torch.tensor([25.0, 0.5, 1e-4]))
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    images = _images(vit)
    out, expected = compiled(images), eager(images)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(enc.temperatures.detach(), torch.tensor([10.0, 0.5, 0.01]))
    g, = torch.autograd.grad(out.square().sum(), [enc.temperatures])
    g_e, = torch.autograd.grad(expected.square().sum(), [eager.temperatures])
    torch.testing.assert_close(g, g_e, atol=1e-5, rtol=1e-5)
    assert torch.all(g != 0)


# --- prompt dropout: one mask per image -----------------------------------------------------------
def _block_inputs(enc, images):
    """The tokens entering each block (norm1's input: every method calls it on the block input)."""
    seen = []
    hooks = [b.norm1.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
             for b in enc.vit.blocks]
    try:
        enc(images)
    finally:
        for h in hooks:
            h.remove()
    return seen[:len(enc.vit.blocks)]


# (method, block whose input shows the dropped prompts, the parameter row it shows or None)
DROPOUT_CASES = [
    ("vpt-shallow", 0, lambda e: e.prompts),
    ("vpt-deep", 0, lambda e: e.prompts[0]),
    ("vpt-deep", 2, lambda e: e.prompts[2]),
    ("gapt", 0, lambda e: e.prompts),
    ("lspt", 0, lambda e: e.prompts[0]),          # P[0]
    ("lspt", 1, None),                            # P[1], the LSTM input after block 1
]


@pytest.mark.parametrize("method,block,row", DROPOUT_CASES,
                         ids=[f"{m}-block{b}" for m, b, _ in DROPOUT_CASES])
def test_identical_images_get_different_prompt_masks(method, block, row):
    vit = make_vit()
    enc = build_encoder(method, vit, num_prompts=NP, num_classes=NC, prompt_dropout=0.5)
    if row is None:
        # Only P[1]'s dropout may make the images differ before block 2: P[0] = 0 is the same after any
        # mask, and the LSTM's hidden input (block 1's outputs + patch mean) is the same for both images.
        with torch.no_grad():
            enc.prompts[0].zero_()
    one = _images(vit, batch=1)
    images = one.expand(4, -1, -1, -1).contiguous()
    k = enc.num_prefix_tokens
    torch.manual_seed(0)
    slots = _block_inputs(enc.train(), images)[block][:, k:k + NP]        # (4, Np, D)
    assert not torch.equal(slots[0], slots[1]) and not torch.equal(slots[2], slots[3])
    if row is not None:
        P = row(enc).detach()
        for b in range(4):       # each image: P with its own elements zeroed and the rest scaled by 1/(1-p)
            kept = slots[b] != 0
            assert 0 < kept.float().mean() < 1
            torch.testing.assert_close(slots[b][kept], (P * 2)[kept])
    slots = _block_inputs(enc.eval(), images)[block][:, k:k + NP]
    assert all(torch.equal(slots[0], slots[b]) for b in range(1, 4))
    if row is not None:
        torch.testing.assert_close(slots[0], row(enc).detach())


def _pair(method, vit, **kw):
    if method == "vpt-deep":
        return VPTEncoder(vit, NP, NC, deep=True, **kw), R.ReferenceVPT(vit, NP, NC, deep=True, **kw)
    if method == "vpt-shallow":
        return VPTEncoder(vit, NP, NC, deep=False, **kw), R.ReferenceVPT(vit, NP, NC, deep=False, **kw)
    if method == "gapt":
        return GaPTEncoder(vit, NP, NC, gate_init=1.0, **kw), R.ReferenceGaPT(vit, NP, NC, gate_init=1.0, **kw)
    if method == "lspt-gru":
        return (LSPTEncoder(vit, NP, NC, lpc="gru", **kw),
                R.ReferenceLSPT(vit, NP, NC, lpc="gru", **kw))
    return LSPTEncoder(vit, NP, NC, **kw), R.ReferenceLSPT(vit, NP, NC, **kw)


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep", "gapt", "lspt", "lspt-gru"])
def test_dropout_matches_reference_in_train_mode(method):
    """Same seed, same masks: the encoders drop exactly what the reference (expand, then dropout) drops."""
    vit = make_vit()
    enc, ref = _pair(method, vit, prompt_dropout=0.3)
    ref.load_state_dict(enc.tuned_state_dict(), strict=False)
    enc.train(), ref.train()
    images = _images(vit, batch=3)
    torch.manual_seed(7)
    out = enc(images)
    torch.manual_seed(7)
    expected = ref(images)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(8)
    assert not torch.allclose(enc(images), out)              # another draw, other masks
    names = [n for n, p in enc.named_parameters() if p.requires_grad]
    upstream = torch.randn_like(out)
    g = torch.autograd.grad(out, [dict(enc.named_parameters())[n] for n in names], upstream)
    g_r = torch.autograd.grad(expected, [dict(ref.named_parameters())[n] for n in names], upstream)
    for n, a, b in zip(names, g, g_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")


# --- head init ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_official_head_init(method):
    """GaPT src/models/mlp.py:52-57 (MLP_NUM = 0: the head is the last layer alone): kaiming-normal
    fan_out weight (std sqrt(2 / num_classes)), bias -log((1 - 0.01) / 0.01)."""
    torch.manual_seed(0)
    enc = build_encoder(method, make_vit(), num_prompts=NP, num_classes=2000, head_init="official")
    w, b = enc.head.weight.detach(), enc.head.bias.detach()
    assert w.shape == (2000, 32)
    assert abs(w.std().item() / math.sqrt(2 / 2000) - 1) < 0.03 and abs(w.mean().item()) < 3e-3
    assert torch.all(b == torch.tensor(-math.log(99.0)))
    default = build_encoder(method, make_vit(), num_prompts=NP, num_classes=2000)
    assert abs(default.head.bias.detach()).max() <= 1 / math.sqrt(32)     # nn.Linear's own init


# --- MAE pooling ----------------------------------------------------------------------------------
def _mae_file(vit, path):
    sd = {k: v.clone() for k, v in vit.state_dict().items() if not k.startswith("head")}
    sd["mask_token"] = torch.zeros(1, 1, 16)
    sd["decoder_embed.weight"] = torch.zeros(16, vit.embed_dim)
    torch.save({"model": sd, "epoch": 1}, path)
    return path


def _last_block_output(enc, images):
    out = []
    h = enc.vit.blocks[-1].register_forward_hook(lambda m, a, o: out.append(o.detach().clone()))
    try:
        features = enc.forward_features(images)
    finally:
        h.remove()
    return out[-1], features


def _random_norm(vit):
    with torch.no_grad():       # a final norm that is not the identity, so using it (or not) shows
        vit.norm.weight.uniform_(0.5, 1.5)
        vit.norm.bias.uniform_(-0.5, 0.5)
    return vit


@pytest.mark.parametrize("given", ["name", "module"])
def test_from_timm_mae_file_gives_mae_pooling(tmp_path, given):
    if given == "name":
        import timm
        torch.manual_seed(0)
        source = _random_norm(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                                img_size=32))
        path = _mae_file(source, tmp_path / "mae.pth")
        enc = from_timm("vit_tiny_patch16_224", checkpoint=path, img_size=32, num_prompts=NP, num_classes=NC)
    else:
        source = _random_norm(make_vit())
        path = _mae_file(source, tmp_path / "mae.pth")
        enc = from_timm(make_vit(), checkpoint=path, num_prompts=NP, num_classes=NC)
    assert enc.pool == "mae" and enc.config()["pool"] == "mae"
    images = _images(enc.vit)
    last, features = _last_block_output(enc, images)
    # Official order (vit_prompt/vit_mae.py:162-164): mean of every token after CLS, then the norm.
    expected = torch.nn.functional.layer_norm(last[:, 1:].mean(1), (enc.embed_dim,), source.norm.weight,
                                              source.norm.bias, source.norm.eps)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    wrong_order = enc.vit.norm(last)[:, 1:].mean(1)
    assert not torch.allclose(features, wrong_order, atol=1e-3)
    torch.testing.assert_close(enc(images), enc.head(expected), atol=1e-5, rtol=1e-5)
    # The override: CLS after the final norm, as before.
    cls = from_timm(make_vit() if given == "module" else "vit_tiny_patch16_224", checkpoint=path,
                    pool="token", num_prompts=NP, num_classes=NC,
                    **({} if given == "module" else dict(img_size=32)))
    last, features = _last_block_output(cls, images)
    torch.testing.assert_close(features, cls.vit.norm(last)[:, 0], atol=1e-6, rtol=1e-6)


def test_moco_and_plain_files_keep_the_model_pooling(tmp_path):
    vit = make_vit()
    torch.save(vit.state_dict(), tmp_path / "plain.pth")
    assert from_timm(make_vit(), checkpoint=tmp_path / "plain.pth", num_classes=NC).pool == "model"
    sd = {"module.base_encoder." + k: v for k, v in vit.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "moco.pth")
    assert from_timm(make_vit(), checkpoint=tmp_path / "moco.pth", num_classes=NC).pool == "model"
    assert from_timm(make_vit(), num_classes=NC).pool == "model"


def test_mae_file_into_an_avg_pool_vit(tmp_path):
    """timm's global_pool='avg' layout has fc_norm instead of norm: the MAE file's norm.* goes there, and
    the pooled features are those of the token-layout model with the same weights."""
    source = _random_norm(make_vit())
    path = _mae_file(source, tmp_path / "mae.pth")
    avg = make_vit(global_pool="avg")
    assert "fc_norm.weight" in avg.state_dict() and "norm.weight" not in avg.state_dict()
    a = from_timm(avg, checkpoint=path, method="vpt-deep", num_prompts=NP, num_classes=NC)
    t = from_timm(make_vit(), checkpoint=path, method="vpt-deep", num_prompts=NP, num_classes=NC)
    assert torch.equal(a.vit.fc_norm.weight, source.norm.weight)
    t.load_state_dict(a.state_dict(), strict=False)
    images = _images(source)
    torch.testing.assert_close(a.forward_features(images), t.forward_features(images), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pool", ["mae", "token"])
@pytest.mark.parametrize("method", ["linear", "vpt-deep", "gapt", "lspt", "adapter"])
def test_pools_match_reference(method, pool):
    vit = _random_norm(make_vit())
    enc = build_encoder(method, vit, num_prompts=NP, num_classes=NC, pool=pool)
    ref = {"linear": lambda: R.ReferenceLinearProbe(vit, NC, pool=pool),
           "vpt-deep": lambda: R.ReferenceVPT(vit, NP, NC, pool=pool),
           "gapt": lambda: R.ReferenceGaPT(vit, NP, NC, pool=pool),
           "lspt": lambda: R.ReferenceLSPT(vit, NP, NC, pool=pool),
           "adapter": lambda: R.ReferenceAdapter(vit, NC, pool=pool)}[method]()
    ref.load_state_dict(enc.tuned_state_dict(), strict=False)
    images = _images(vit)
    torch.testing.assert_close(enc(images), ref(images), atol=1e-5, rtol=1e-5)


def test_bad_pool():
    with pytest.raises(ValueError, match=r"pool must be one of \('model', 'token', 'mae'\), got 'cls'"):
        LSPTEncoder(make_vit(), NP, NC, pool="cls")
    with pytest.raises(ValueError, match="pool='token' needs a ViT with a class token"):
        VPTEncoder(make_vit(class_token=False, global_pool="avg"), NP, NC, pool="token")
    with pytest.raises(ValueError, match="pool must be one of .* or None"):
        from_timm(make_vit(), pool="max", num_classes=NC)


def test_legacy_format_mae_file(tmp_path):
    """A pre-zip torch.save file cannot be memory-mapped: the format check falls back to a full read."""
    source = make_vit()
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert from_timm(make_vit(), checkpoint=tmp_path / "old.pth", num_classes=NC).pool == "mae"
