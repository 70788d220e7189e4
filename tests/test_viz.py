"""lspt_kernels.viz: per-block maps against a direct computation, and the lspt-viz CLI."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_vit

from lspt_kernels import viz
from lspt_kernels.cli_helpers import load_tuned_encoder
from lspt_kernels.encoders import build_encoder

NP = 3
# The CLI builds this ViT (helpers.make_vit) as `--model vit_tiny_patch16_224 --img-size 32 --model-kwargs ...`.
TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", "patch_size=8", "embed_dim=32",
             "depth=3", "num_heads=2", "reg_tokens=0", "global_pool='token'", "class_token=True"]


def _sharpen(vit):
    """Random-init timm ViTs attend almost uniformly; larger q/k weights make every block's map
    distinct, so a map taken from the wrong block, token or temperature cannot pass."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight.copy_(torch.randn(blk.attn.qkv.weight.shape, generator=g) * 0.4)
    return vit


def _hand_probs(blk, x, t=1.0):
    """Softmax attention of a timm Block on its input x, written out: (B, heads, T, T)."""
    B, T, D = x.shape
    H = blk.attn.num_heads
    xn = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    qkv = xn @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k = qkv[..., :D], qkv[..., D:2 * D]
    q = q.reshape(B, T, H, D // H).transpose(1, 2)
    k = k.reshape(B, T, H, D // H).transpose(1, 2)
    return ((q @ k.transpose(-1, -2)) / math.sqrt(D // H) / t).softmax(-1)


def _hand_block(blk, x, t=1.0):
    B, T, D = x.shape
    H = blk.attn.num_heads
    xn = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    v = (xn @ blk.attn.qkv.weight[2 * D:].T + blk.attn.qkv.bias[2 * D:]).reshape(B, T, H, D // H).transpose(1, 2)
    a = (_hand_probs(blk, x, t) @ v).transpose(1, 2).reshape(B, T, D)
    h = x + blk.attn.proj(a)
    return h + blk.mlp(F.layer_norm(h, (D,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps))


def _embed(vit, images):
    return vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))


def _hand_maps(x, blk, k, n, grid, queries, t=1.0):
    """(similarity, attention) of one block from its input x, by the definitions."""
    B = x.shape[0]
    prompts, patches = x[:, k:k + n], x[:, k + n:]
    sim = torch.stack([torch.stack([F.cosine_similarity(prompts[:, i], patches[:, j], dim=-1)
                                    for j in range(patches.shape[1])], -1) for i in range(n)], 1).mean(1)
    att = _hand_probs(blk, x, t)[:, :, queries, k + n:].mean(dim=(1, 2))
    return sim.reshape(B, *grid), att.reshape(B, *grid)


def _images(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("l", [0, 2])
def test_vpt_deep_maps_equal_the_direct_computation(l):
    vit = _sharpen(make_vit())
    torch.manual_seed(0)
    enc = build_encoder("vpt-deep", vit, num_prompts=NP, num_classes=4)
    images = _images()
    maps = viz.block_maps(enc, images)
    with torch.no_grad():
        P = enc.prompts
        x = _embed(vit, images)
        x = torch.cat([x[:, :1], P[0].expand(2, -1, -1), x[:, 1:]], 1)
        for j in range(l):
            x = _hand_block(vit.blocks[j], x)
            x = torch.cat([x[:, :1], P[j + 1].expand(2, -1, -1), x[:, 1 + NP:]], 1)
        sim, att = _hand_maps(x, vit.blocks[l], 1, NP, (4, 4), [0])
    torch.testing.assert_close(maps["similarity"][:, l], sim, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps["attention"][:, l], att, atol=1e-5, rtol=1e-5)
    assert maps["queries"] == "the CLS token"
    # The maps are far from uniform and differ between blocks, so the comparison above can fail.
    assert (maps["attention"][:, 0] - maps["attention"][:, 1]).abs().max() > 1e-2
    assert viz.similarity_maps(enc, images).shape == viz.attention_maps(enc, images).shape == (2, 3, 4, 4)


def test_gapt_maps_include_its_clamped_temperature():
    vit = _sharpen(make_vit())
    torch.manual_seed(0)
    enc = build_encoder("gapt", vit, num_prompts=NP, num_classes=4)
    temps = [0.5, 3.0, 0.001]                         # the last one is projected to 0.01
    with torch.no_grad():
        enc.temperatures.copy_(torch.tensor(temps))
        enc.gate_logits.copy_(torch.tensor([0.3, -1.0]))
    images = _images()
    maps = viz.block_maps(enc, images)
    with torch.no_grad():
        x = _embed(vit, images)
        x = torch.cat([x[:, :1], enc.prompts.expand(2, -1, -1), x[:, 1:]], 1)
        for l in range(3):
            t = min(max(temps[l], 0.01), 10.0)
            sim, att = _hand_maps(x, vit.blocks[l], 1, NP, (4, 4), [0], t)
            torch.testing.assert_close(maps["similarity"][:, l], sim, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(maps["attention"][:, l], att, atol=1e-5, rtol=1e-5)
            out = _hand_block(vit.blocks[l], x, t)
            if l < 2:
                g = torch.sigmoid(enc.gate_logits[l])
                out[:, 1:1 + NP] = g * out[:, 1:1 + NP] + (1 - g) * x[:, 1:1 + NP]
            x = out
        # Without the temperature the last block's map would be different: the check above sees it.
        _, plain = _hand_maps(x, vit.blocks[2], 1, NP, (4, 4), [0])
    assert (plain - maps["attention"][:, 2]).abs().max() > 1e-3
    assert viz._temperature(enc, 2) == pytest.approx(0.01)
    assert viz._temperature(build_encoder("lspt", vit, num_prompts=NP, num_classes=4), 2) == 1.0


def test_lspt_maps_match_the_reference_block_inputs():
    """The prompts entering block l of LSPT come from the fused step; the oracle's own loop
    (python/lspt_reference) gives the block inputs, the maps are then computed by hand."""
    from lspt_reference import ReferenceLSPT
    vit = _sharpen(make_vit(embed_dim=24, depth=4, heads=3, reg_tokens=4, global_pool="avg", img=24))
    torch.manual_seed(0)
    enc = build_encoder("lspt", vit, num_prompts=NP, num_classes=4)
    with torch.no_grad():
        enc.lstm.weight_hh.mul_(5)                    # make the carried prompts clearly image-dependent
    ref = ReferenceLSPT(vit, NP, 4)
    ref.load_state_dict(enc.tuned_state_dict(), strict=False)
    images = _images(2, 24)
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone())) for b in vit.blocks]
    with torch.no_grad():
        ref(images)
    for h in hooks:
        h.remove()
    k = vit.num_prefix_tokens                         # CLS + 4 registers
    for src, queries in (("cls", [0]), ("prompts", list(range(k, k + NP)))):
        maps = viz.block_maps(enc, images, source=src)
        for l in (0, 3):
            sim, att = _hand_maps(inputs[l], vit.blocks[l], k, NP, (3, 3), queries)
            torch.testing.assert_close(maps["similarity"][:, l], sim, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(maps["attention"][:, l], att, atol=1e-5, rtol=1e-5)


def test_no_class_token_uses_the_pooled_tokens_and_linear_probe_has_no_similarity():
    vit = _sharpen(make_vit(class_token=False, global_pool="avg"))
    torch.manual_seed(0)
    enc = build_encoder("vpt-shallow", vit, num_prompts=NP, num_classes=4)
    images = _images()
    maps = viz.block_maps(enc, images, ("attention",))
    with torch.no_grad():
        x = _embed(vit, images)
        x = torch.cat([enc.prompts.expand(2, -1, -1), x], 1)
        _, att = _hand_maps(x, vit.blocks[0], 0, NP, (4, 4), list(range(x.shape[1])))
    torch.testing.assert_close(maps["attention"][:, 0], att, atol=1e-5, rtol=1e-5)
    assert "no class token" in maps["queries"]

    probe = build_encoder("linear", make_vit(), num_classes=4)
    with pytest.raises(ValueError, match="similarity maps need prompt tokens"):
        viz.similarity_maps(probe, images)
    with pytest.raises(ValueError, match="source='prompts' needs prompt tokens"):
        viz.attention_maps(probe, images, source="prompts")
    assert viz.attention_maps(probe, images).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="kinds must be"):
        viz.block_maps(enc, images, ("saliency",))
    with pytest.raises(ValueError, match="source must be"):
        viz.block_maps(enc, images, source="patches")
    with pytest.raises(ValueError, match=r"maps must be a \(B, L, h, w\) tensor"):
        viz.summarize("attention", torch.zeros(3, 4, 4))
    # A post-norm block (norm1 after the attention) would give the wrong attention input: refused.
    from timm.models.vision_transformer import ResPostBlock
    post = build_encoder("lspt", make_vit(block_fn=ResPostBlock), num_prompts=NP, num_classes=4)
    with pytest.raises(TypeError, match="needs timm's pre-norm Block.*block 0 is ResPostBlock"):
        viz.attention_maps(post, images)


def test_maps_keep_the_patch_grid_orientation_of_a_non_square_image():
    """Prompts equal to the patch token at (row 3, column 2) of a 5 x 3 grid: block 1's similarity
    map peaks (cosine 1) exactly there, so rows and columns are not swapped or transposed."""
    vit = make_vit(dynamic_img_size=True)
    torch.manual_seed(0)
    enc = build_encoder("vpt-deep", vit, num_prompts=NP, num_classes=4)
    images = torch.randn(1, 3, 40, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        patch = _embed(vit, images)[0, 1 + 3 * 3 + 2]                # CLS, then row-major patches
        enc.prompts[0].copy_(patch.expand(NP, -1))
    sim = viz.similarity_maps(enc, images)
    assert sim.shape == (1, 3, 5, 3)
    assert sim[0, 0, 3, 2] == pytest.approx(1.0, abs=1e-5)
    assert (sim[0, 0] < 0.999).sum() == 14


def test_output_names_of_images_with_the_same_stem():
    names = viz._image_names([Path("val/red/000.png"), Path("val/blue/000.png"), Path("a/x.png"),
                              Path("b/x.jpg"), Path("c/x/k.png"), Path("d/x/k.png")])
    assert names == ["red_000", "blue_000", "a_x", "b_x", "x_k-4", "x_k-5"]


def test_summary_scalars():
    uniform = torch.full((1, 1, 2, 2), 0.2)          # 0.8 of the attention on patches, evenly
    peaked = torch.tensor([0.9, 0.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    u, p = viz.summarize("attention", uniform)[0][0], viz.summarize("attention", peaked)[0][0]
    assert u["normalized_entropy"] == pytest.approx(1.0) and u["entropy"] == pytest.approx(math.log(4))
    assert u["patch_mass"] == pytest.approx(0.8)
    assert p["entropy"] == pytest.approx(0.0, abs=1e-12) and p["patch_mass"] == pytest.approx(0.9)
    s = viz.summarize("similarity", torch.tensor([-0.5, 0.5, 0.5, 0.5]).reshape(1, 1, 2, 2))[0][0]
    assert s == dict(block=1, mean=pytest.approx(0.25), std=pytest.approx(math.sqrt(3) / 4),
                     contrast=pytest.approx(1.0))


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _write_image(path, size, seed):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 80).to(torch.uint8)
    pixels[size[1] // 4: size[1] // 2, size[0] // 3: 2 * size[0] // 3] = 230      # a bright "object"
    Image.fromarray(pixels.numpy()).save(path)
    return path


@pytest.fixture
def tuned_files(tmp_path):
    vit = make_vit()                                  # the CLI's --model / --model-kwargs / --seed 0 backbone
    files = []
    for method in ("gapt", "lspt"):
        torch.manual_seed(1)
        enc = build_encoder(method, vit, num_prompts=NP, num_classes=5)
        files.append(tmp_path / f"{method}.safetensors")
        enc.save_tuned(files[-1])
    return files


def test_cli_writes_pngs_and_summary_for_two_tuned_files_and_two_images(tmp_path, tuned_files):
    imgs = [_write_image(tmp_path / "cat.png", (50, 40), 0), _write_image(tmp_path / "dog.jpg", (32, 64), 1)]
    out = tmp_path / "out"
    argv = [a for f in tuned_files for a in ("--tuned", str(f))] + TINY_ARGS + \
        [a for f in imgs for a in ("--image", str(f))] + ["--output", str(out)]
    assert viz.main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cat_attention.png", "cat_similarity.png", "dog_attention.png", "dog_similarity.png",
                     "summary.json"]
    from PIL import Image
    with Image.open(out / "cat_similarity.png") as im:
        assert im.width > im.height > 100             # two rows (GaPT, LSPT) of 1 + 3 panels
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["method"], Path(r["image"]).name) for r in summary["results"]] == [
        ("gapt", "cat.png"), ("gapt", "dog.jpg"), ("lspt", "cat.png"), ("lspt", "dog.jpg")]
    for r in summary["results"]:
        assert [b["block"] for b in r["attention"]] == [b["block"] for b in r["similarity"]] == [1, 2, 3]
    # The CLI's numbers are the API's on the same backbone, encoder and preprocessed image.
    vit = make_vit()
    enc = load_tuned_encoder(tuned_files[1], vit)
    x, pixels = viz.load_image(imgs[1], 32)
    assert pixels.shape == (32, 32, 3)
    maps = viz.block_maps(enc, x[None])
    r = summary["results"][3]
    for kind in viz.KINDS:        # batch 2 in the CLI, 1 here: equal up to float rounding
        assert r[kind] == [pytest.approx(d, rel=1e-5, abs=1e-7) for d in viz.summarize(kind, maps[kind])[0]]

    # --kind attention --from prompts: only attention PNGs, from the prompt tokens; the spelling lspt-viz
    # used to have for the model arguments (--model-arg K=V, repeated) still works.
    out2 = tmp_path / "out2"
    argv2 = [a for f in tuned_files for a in ("--tuned", str(f))] + TINY_ARGS[:4] + \
        ["--model-arg", "patch_size=8", "--model-arg", "embed_dim=32", "--model-arg", "depth=3", "--model-arg",
         "num_heads=2"] + \
        [a for f in imgs for a in ("--image", str(f))] + ["--output", str(out2)]
    assert viz.main(argv2 + ["--kind", "attention", "--from", "prompts"]) == 0
    assert sorted(p.name for p in out2.glob("*.png")) == ["cat_attention.png", "dog_attention.png"]
    assert json.loads((out2 / "summary.json").read_text())["results"][0]["attention_queries"] == \
        "the prompt tokens (mean)"


def _save_as_lspt_train(enc, path, meta):
    """A tuned file as lspt-train writes it: save_tuned with its record of the backbone and data."""
    enc.save_tuned(path, metadata={"lspt_train": meta})
    return path


def test_cli_takes_the_backbone_lspt_train_recorded(tmp_path, capsys):
    import timm
    kw = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)
    meta = dict(model="vit_tiny_patch16_224", img_size=32, model_kwargs=kw, seed=7, checkpoint=None,
                mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    torch.manual_seed(7)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **kw)
    enc = build_encoder("lspt", vit, num_prompts=NP, num_classes=5, prompt_dropout=0.1)
    f = _save_as_lspt_train(enc, tmp_path / "best.safetensors", meta)
    img = _write_image(tmp_path / "x.png", (40, 40), 2)
    out = tmp_path / "o"
    assert viz.main(["--tuned", str(f), "--image", str(img), "--output", str(out)]) == 0
    assert "random init under seed 7, as lspt-train recorded" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["model"], summary["seed"], summary["mean"], summary["model_kwargs"]) == \
        ("vit_tiny_patch16_224", 7, [0.5] * 3, kw)
    x, _ = viz.load_image(img, 32, meta["mean"], meta["std"])
    maps = viz.block_maps(enc, x[None])
    for kind in viz.KINDS:
        assert summary["results"][0][kind] == [pytest.approx(d, rel=1e-5, abs=1e-7)
                                               for d in viz.summarize(kind, maps[kind])[0]]

    assert viz.main(["--tuned", str(f), "--image", str(img), "--output", str(out), "--seed", "8"]) == 0
    err = capsys.readouterr().err
    assert "random init under seed 8 (--seed; lspt-train recorded 7)" in err and "as lspt-train recorded" not in err
    assert "lspt-viz: warning: the backbone is not the one the tuned file was trained on: --seed 8 (lspt-train " \
           "recorded 7)" in err

    other = _save_as_lspt_train(enc, tmp_path / "other.safetensors", dict(meta, seed=8))
    rc, err = _run_cli(["--tuned", str(f), "--tuned", str(other), "--image", str(img), "--output", str(out)], capsys)
    assert rc == 2 and "trained on different backbones" in err and "seed=8" in err
    plain = tmp_path / "plain.safetensors"
    enc.save_tuned(plain)
    rc, err = _run_cli(["--tuned", str(plain), "--image", str(img), "--output", str(out)], capsys)
    assert rc == 2 and "--model is needed" in err and "plain.safetensors" in err


def _run_cli(argv, capsys):
    rc = viz.main(argv)
    return rc, capsys.readouterr().err


def _file_of_another_vit(tmp_path):
    other = tmp_path / "other.safetensors"
    build_encoder("lspt", make_vit(embed_dim=24, depth=4, heads=3), num_prompts=NP, num_classes=5).save_tuned(other)
    return other


def _safetensors_without_metadata(tmp_path):
    from safetensors.torch import save_file
    save_file({"prompts": torch.zeros(3, NP, 32)}, str(tmp_path / "plain.safetensors"))
    return tmp_path / "plain.safetensors"


def _blocked_output(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file" / "sub"


def _linear_probe_file(tmp_path):
    build_encoder("linear", make_vit(), num_classes=5).save_tuned(tmp_path / "linear.safetensors")
    return tmp_path / "linear.safetensors"


def _broken_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    return tmp_path / "broken.png"


def _damaged_record(tmp_path):
    """A tuned file whose lspt-train record was cut short (a JSON text, not an object)."""
    path = tmp_path / "damaged.safetensors"
    build_encoder("lspt", make_vit(), num_prompts=NP, num_classes=5).save_tuned(
        path, metadata={"lspt_train": '{"model": "vit_tiny_patch16_224", "img_si'})
    return path


def _truncated(tmp_path, tuned):
    data = Path(tuned).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    return tmp_path / "cut.safetensors"


BAD_CLI = {        # case: changes to the good command line (given tmp_path) -> the error's pattern
    "broken-image": (lambda tmp: dict(image=_broken_image(tmp)), r"cannot read image .*broken.png"),
    "missing-image": (lambda tmp: dict(image=tmp / "missing.png"), r"image file not found: .*missing.png"),
    "tuned-on-another-vit": (lambda tmp: dict(tuned=_file_of_another_vit(tmp)),
                             r"other.safetensors was tuned on a different ViT \(embed_dim=24, depth=4\) than the one "
                             r"given \(embed_dim=32, depth=3\)"),
    "missing-tuned": (lambda tmp: dict(tuned=tmp / "nope.safetensors"), r"--tuned \S*nope.safetensors: no such file"),
    "not-from-save-tuned": (lambda tmp: dict(tuned=_safetensors_without_metadata(tmp)),
                            "it was not written by save_tuned"),
    "output-not-writable": (lambda tmp: dict(output=_blocked_output(tmp)), r"--output \S*a_file/sub is not writable"),
    "unknown-device": (lambda tmp: dict(extra=["--device", "gpu0"]),
                       r"--device: expected cpu, cuda or cuda:N, got 'gpu0'"),
    "unknown-model": (lambda tmp: dict(model=["--model", "vit_nonexistent"]),
                      "--model 'vit_nonexistent': unknown timm model"),
    "prompts-of-a-linear-probe": (lambda tmp: dict(tuned=_linear_probe_file(tmp), extra=["--from", "prompts"]),
                                  "linear.safetensors has no prompt tokens; use --from cls"),
    "damaged-record": (lambda tmp: dict(tuned=_damaged_record(tmp)),
                       r"damaged.safetensors: its 'lspt_train' metadata is damaged: expected a JSON object"),
    "truncated-file": (lambda tmp: dict(tuned=_truncated(tmp, _linear_probe_file(tmp))),
                       r"cut.safetensors is not a safetensors file"),
    "negative-seed": (lambda tmp: dict(extra=["--seed", "-1"]), r"--seed must be >= 0, got -1"),
}


def _argv(tmp_path, tuned, image, output=None, model=None, extra=()):
    return ["--tuned", str(tuned), *(TINY_ARGS if model is None else model), "--image", str(image),
            "--output", str(output or tmp_path / "o"), *extra]


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_cli_bad_input(tmp_path, tuned_files, capsys, case):
    change, pattern = BAD_CLI[case]
    args = dict(tuned=tuned_files[0], image=_write_image(tmp_path / "ok.png", (32, 32), 0))
    args.update(change(tmp_path))
    rc, err = _run_cli(_argv(tmp_path, **args), capsys)
    assert rc == 2 and "lspt-viz: error: " in err and re.search(pattern, err), err


def test_cli_linear_probe_gets_attention_maps_only(tmp_path, capsys):
    img = _write_image(tmp_path / "ok.png", (32, 32), 0)
    rc, err = _run_cli(_argv(tmp_path, _linear_probe_file(tmp_path), img), capsys)
    assert rc == 0 and "no similarity maps" in err and "linear.safetensors" in err
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["ok_attention.png"]


def test_model_arg_is_a_hidden_alias():
    text = viz.build_parser().format_help()
    assert "--model-kwargs" in text and "--model-arg " not in text and "--model-arg\n" not in text


def test_python_dash_m_runs():
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "python"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "lspt_kernels.viz", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0 and "--tuned" in proc.stdout and "--from" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_maps_on_the_gpu_equal_the_cpu_maps():
    vit = _sharpen(make_vit())
    torch.manual_seed(0)
    for method in ("lspt", "gapt"):
        enc = build_encoder(method, vit, num_prompts=NP, num_classes=4)
        images = _images()
        cpu = viz.block_maps(enc, images)
        gpu = viz.block_maps(enc.cuda(), images.cuda())
        enc.cpu()
        for kind in viz.KINDS:
            assert gpu[kind].device.type == "cpu"
            torch.testing.assert_close(gpu[kind], cpu[kind], atol=2e-3, rtol=2e-3)


def test_16bit_image_is_opened_as_in_training(tmp_path):
    import numpy as np
    from PIL import Image
    eight = np.asarray(Image.open(_write_image(tmp_path / "g8.png", (40, 40), 3)).convert("L"))
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "g16.png")    # the same image in 16 bits
    Image.fromarray(eight).save(tmp_path / "g8.png")
    x8, pixels8 = viz.load_image(tmp_path / "g8.png", 32)
    x16, pixels16 = viz.load_image(tmp_path / "g16.png", 32)
    assert torch.equal(pixels8, pixels16) and torch.equal(x8, x16)
