"""The command-line tools on timm Eva backbones: lspt-train learns the synthetic set with a tiny DINOv3-style
model and lspt-eval reproduces it; lspt-train --model eva02_... --checkpoint reads a file of EVA-02's
release through timm's filter, with the release's normalisation; lspt-viz's attention maps are timm's own
softmax (rope included); lspt-bench runs on a DINOv3 and an EVA-02 config."""
import json

import pytest
import torch
from helpers import EVA_FLAVOURS, eva02_release, make_eva, noisy, vit_images
from synth_data import write_dataset

from lspt_kernels import VPTEncoder, cli_helpers, viz
from lspt_kernels import evaluate as lspt_eval
from lspt_kernels import train as lspt_train
from lspt_kernels.bench import cli as bench_cli

NP, NC = 3, 4


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _tiny(flavour):
    name, extra = EVA_FLAVOURS[flavour]
    make_eva(flavour, depth=1)                     # skips the test where this timm lacks the model
    kwargs = [f"{k}={v}" for k, v in dict(extra, patch_size=8, embed_dim=32, depth=2, num_heads=2).items()]
    return ["--model", name, "--img-size", "32", "--model-kwargs", *kwargs]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth") / "data", "imagefolder", size=32)


def _args(data, out, flavour, *extra, method="lspt", epochs=2):
    warmup = "1" if epochs > 1 else "0"          # a warm-up as long as the run is refused
    return ["--data", str(data), *_tiny(flavour), "--method", method, "--epochs", str(epochs),
            "--warmup-epochs", warmup, "--batch-size", "8", "--lr", "1", "--workers", "0", "--device", "cpu",
            "--output", str(out), *extra]


def _train_and_eval(data, out, capsys, epochs, *extra):
    assert lspt_train.main(_args(data, out, "dinov3", *extra, epochs=epochs)) == 0
    best = max(r["val_acc"] for r in _log(out))
    capsys.readouterr()
    assert lspt_eval.main(["--data", str(data), "--tuned", str(out / "best.safetensors")]) == 0
    assert f"top-1 {best:.2f}%" in capsys.readouterr().out.strip().splitlines()[-1]
    encoder, config, record = cli_helpers.rebuild_encoder(out / "best.safetensors")
    assert type(encoder.vit).__name__ == "Eva" and encoder.vit.num_prefix_tokens == 5 and config["method"] == "lspt"
    return [r["val_acc"] for r in _log(out)]


@pytest.mark.slow
def test_lspt_learns_the_synthetic_set_on_a_dinov3_model(data, tmp_path, capsys):
    accs = _train_and_eval(data, tmp_path / "run", capsys, 8)
    assert accs[0] <= 50.0 and max(accs) >= 90.0, accs                  # 4 classes: chance 25 %


def test_lspt_trains_saves_and_evaluates_on_a_dinov3_model(data, tmp_path, capsys):
    """The fast sibling: two epochs, the tuned file rebuilds the Eva and lspt-eval reproduces the log."""
    accs = _train_and_eval(data, tmp_path / "run", capsys, 2, "--limit-train-batches", "3")
    assert len(accs) == 2


def test_lspt_train_reads_an_eva02_release_file(data, tmp_path, capsys):
    source = noisy(make_eva("eva02-base"))
    ckpt = tmp_path / "eva02_B_pt_in21k_p14.pt"
    torch.save(eva02_release(source), ckpt)
    out = tmp_path / "run"
    args = _args(data, out, "eva02-base", "--checkpoint", str(ckpt), "--limit-train-batches", "1", epochs=1)
    assert lspt_train.main(args) == 0
    encoder, _, record = cli_helpers.rebuild_encoder(out / "last.safetensors")
    assert record["checkpoint"] == str(ckpt.resolve())
    assert record["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])      # EVA-02's CLIP statistics
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in encoder.vit.state_dict().items())
    capsys.readouterr()
    assert lspt_eval.main(["--data", str(data), "--tuned", str(out / "last.safetensors")]) == 0
    assert f"top-1 {_log(out)[-1]['val_acc']:.2f}%" in capsys.readouterr().out


def _sharpen(vit):
    """Random-init attention is nearly uniform; larger q/k weights make the maps distinct, so a map without
    the rope (or from the wrong block) cannot pass."""
    with torch.no_grad():
        for block in vit.blocks:
            for name in ("qkv", "q_proj", "k_proj"):
                if getattr(block.attn, name, None) is not None:
                    getattr(block.attn, name).weight.mul_(6)
    return vit


@pytest.mark.parametrize("flavour", ["dinov3", "rope-mixed", "sapiens2-gqa"])
def test_viz_attention_maps_are_timms_own_softmax(flavour):
    """lspt-viz's map of block l (CLS -> patches, mean over heads) equals the softmax timm's attention
    computes on its explicit path (captured at its attn_drop), with the prompts in the buffer."""
    vit = _sharpen(make_eva(flavour))
    enc = VPTEncoder(vit, NP, NC, deep=True)
    images = vit_images(vit)
    maps = viz.attention_maps(enc, images)
    k, probs = vit.num_prefix_tokens, []
    for block in vit.blocks:
        block.attn.fused_attn = False
    hooks = [b.attn.attn_drop.register_forward_hook(lambda m, a, out: probs.append(out)) for b in vit.blocks]
    with torch.no_grad():
        enc(images)
    for h in hooks:
        h.remove()
    expected = torch.stack([p[:, :, 0, k + NP:].mean(1) for p in probs], 1).reshape(maps.shape)
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)
    assert (expected[:, 0].flatten(1).std(1) > 1e-3).all()         # not a uniform map


def test_viz_refuses_a_post_norm_eva():
    enc = VPTEncoder(make_eva("post-norm"), NP, NC)
    with pytest.raises(TypeError, match="lspt_kernels.viz needs timm's pre-norm Block or EvaBlock; block 0 is "
                                        "EvaBlockPostNorm"):
        viz.similarity_maps(enc, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("flavour", ["dinov3", "eva02-base"])
def test_bench_runs_on_eva_configs(tmp_path, flavour):
    name = dict(dinov3="vit_base_patch16_dinov3", **{"eva02-base": "eva02_base_patch14_224"})[flavour]
    make_eva(flavour, depth=1)                     # skips the test where this timm lacks the model
    args = ["--model", name, "--img-size", "32", "--model-kwargs", "depth=2", "embed_dim=32", "num_heads=2",
            "patch_size=8", "--batch-size", "1", "--repeats", "2", "--warmup", "1", "--num-prompts", "3",
            "--num-classes", "5", "--device", "cpu", "--in-process", "--no-plot", "--methods",
            "vpt-deep,gapt,lspt-fused", "--output", str(tmp_path / "out")]
    assert bench_cli.main(args) == 0
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["vpt-deep", "gapt", "lspt-fused"]
    assert all(r["status"] == "ok" and r["logits_finite"] for r in rows)
