"""lspt_kernels.cli_helpers, what lspt-train, lspt-eval, lspt-viz and lspt-bench share: --device, --output,
--amp, --model-kwargs, the backbone builder, and the backbone and encoder of a tuned file."""
import argparse
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import make_vit, same_backbone

from lspt_kernels import cli_helpers as C
from lspt_kernels.encoders import build_encoder

TINY_KW = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)


# --- --device ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [(None, "cpu"), ("auto", "cpu"), ("cpu", "cpu")])
def test_device_names_without_a_gpu(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert C.resolve_device(name) == torch.device(expected)


@pytest.mark.parametrize("name, message", [
    ("gpu0", r"--device: expected cpu, cuda or cuda:N, got 'gpu0'"),
    ("cuda:x", r"--device: expected cpu, cuda or cuda:N, got 'cuda:x'"),
    ("cuda", r"--device cuda: no CUDA GPU is available here \(no CUDA device is visible"),
    ("cuda:1", r"--device cuda:1: no CUDA GPU is available here"),
])
def test_bad_device_names(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(C.UsageError, match=message):
        C.resolve_device(name)


def test_cuda_means_the_first_gpu_and_an_index_past_the_last_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert C.resolve_device("cuda") == torch.device("cuda", 0) == C.resolve_device("auto")
    assert C.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(C.UsageError, match=r"--device cuda:2: there are 2 CUDA device\(s\)"):
        C.resolve_device("cuda:2")


# --- --output ----------------------------------------------------------------------------------------
def test_output_dir_is_created_and_left_empty(tmp_path):
    assert C.check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []


@pytest.mark.parametrize("where, message", [("file", "--output .*file exists and is not a directory"),
                                            ("file/sub", "--output .*file/sub is not writable")])
def test_output_dir_that_cannot_be_written(tmp_path, where, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(C.UsageError, match=message):
        C.check_output_dir(tmp_path / where)


# --- --amp -------------------------------------------------------------------------------------------
def test_amp_on_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert C.check_amp("auto", cpu) == "none" and C.check_amp("none", cpu) == "none"
    with pytest.raises(C.UsageError, match="--amp must be one of auto, bf16, fp16, none; got 'fp8'"):
        C.check_amp("fp8", cpu)
    monkeypatch.setattr(C, "cpu_supports_bf16", lambda: True)
    assert C.check_amp("bf16", cpu) == "bf16"
    with C.autocast_context(cpu, "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with C.autocast_context(cpu, "none"):
        assert not torch.is_autocast_enabled("cpu")


# --- --model-kwargs ----------------------------------------------------------------------------------
def test_model_kwargs_are_python_literals_else_strings():
    assert C.parse_model_kwargs(["depth=3", "global_pool=avg", "img_size=(32, 48)", "x= True "]) == dict(
        depth=3, global_pool="avg", img_size=(32, 48), x=True)
    assert C.parse_model_kwargs(None) == {}


@pytest.mark.parametrize("item", ["depth", "=3", "2x=1"])
def test_model_kwargs_that_are_not_key_value(item):
    with pytest.raises(C.UsageError, match=rf"--model-kwargs expects KEY=VALUE items .*got {item!r}"):
        C.parse_model_kwargs([item])


def _parser(alias):
    p = argparse.ArgumentParser()
    C.add_model_kwargs_option(p, alias=alias)
    return p


def test_model_kwargs_option_and_its_hidden_alias():
    p = _parser(alias=True)
    args = p.parse_args(["--model-kwargs", "depth=2", "--model-arg", "embed_dim=32", "--model-kwargs", "x=1",
                         "--model-arg", "a=1", "b=2"])
    assert C.model_kwargs_from_args(args) == dict(depth=2, x=1, embed_dim=32, a=1, b=2)
    assert "--model-arg" not in p.format_help() and "--model-kwargs" in p.format_help()
    with pytest.raises(C.UsageError, match="--model-arg expects KEY=VALUE"):
        C.model_kwargs_from_args(p.parse_args(["--model-arg", "depth"]))
    with pytest.raises(SystemExit):
        _parser(alias=False).parse_args(["--model-arg", "depth=2"])
    assert C.model_kwargs_from_args(_parser(alias=False).parse_args(["--model-kwargs"])) == {}


# --- the backbone --------------------------------------------------------------------------------------
def test_backbone_is_seeded_and_headless():
    a = C.build_backbone("vit_tiny_patch16_224", 32, TINY_KW, seed=3)
    b = C.build_backbone("vit_tiny_patch16_224", 32, TINY_KW, seed=3)
    c = C.build_backbone("vit_tiny_patch16_224", 32, TINY_KW, seed=4)
    assert same_backbone(a, b) and not same_backbone(a, c)
    assert a.num_classes == 0 and a.patch_embed.img_size == (32, 32) and a.embed_dim == 32


def test_backbone_on_the_meta_device_has_shapes_only():
    vit = C.build_backbone("vit_base_patch16_224", device="meta")
    assert vit.pos_embed.is_meta and vit.embed_dim == 768 and len(vit.blocks) == 12


@pytest.mark.parametrize("model, kwargs, message", [
    ("vit_tiny_patch16_2244", {}, r"--model 'vit_tiny_patch16_2244': unknown timm model; did you mean "
                                  r"vit_tiny_patch16_224"),
    ("resnet18", {}, r"--model 'resnet18' is a timm.models.resnet.ResNet, not a timm VisionTransformer"),
    ("vit_tiny_patch16_224", dict(no_such_option=1), r"--model 'vit_tiny_patch16_224' does not take these "
                                                     r"arguments \{'no_such_option': 1\}"),
])
def test_backbone_errors_name_the_model(model, kwargs, message):
    with pytest.raises(C.UsageError, match=message):
        C.build_backbone(model, model_kwargs=kwargs, device="meta")


# --- tuned files ---------------------------------------------------------------------------------------
def _record(**kw):
    return dict(dict(model="vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_KW, seed=7, checkpoint=None,
                     mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]), **kw)


def _tuned(path, record=None, method="lspt", vit=None):
    enc = build_encoder(method, vit or C.build_backbone("vit_tiny_patch16_224", 32, TINY_KW, seed=7),
                        num_prompts=3, num_classes=4)
    enc.save_tuned(path, metadata={C.TRAIN_RECORD: record} if record is not None else None)
    return enc


def test_backbone_spec_from_the_record_and_the_flags(tmp_path):
    _tuned(tmp_path / "a.st", _record())
    spec = C.backbone_spec([tmp_path / "a.st"])
    assert spec == dict(model="vit_tiny_patch16_224", model_kwargs=TINY_KW, img_size=32, seed=7, checkpoint=None,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), recorded=True, record=_record())
    spec = C.backbone_spec([tmp_path / "a.st"], model_kwargs=dict(drop_path_rate=0.1), img_size=48, seed=1)
    assert spec["model_kwargs"] == dict(TINY_KW, drop_path_rate=0.1) and (spec["img_size"], spec["seed"]) == (48, 1)


def test_a_record_applies_to_its_own_model_only(tmp_path):
    _tuned(tmp_path / "a.st", _record())
    assert C.backbone_spec([tmp_path / "a.st"], model="vit_tiny_patch16_224")["model_kwargs"] == TINY_KW
    other = C.backbone_spec([tmp_path / "a.st"], model="vit_small_patch16_224")
    assert other == dict(model="vit_small_patch16_224", model_kwargs={}, img_size=None, seed=0, checkpoint=None,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), recorded=False, record=_record())


def test_backbone_spec_errors(tmp_path):
    _tuned(tmp_path / "plain.st")
    with pytest.raises(C.UsageError, match=r"--model is needed: .*plain.st does not name its backbone"):
        C.backbone_spec([tmp_path / "plain.st"])
    _tuned(tmp_path / "a.st", _record())
    _tuned(tmp_path / "b.st", _record(seed=8))
    with pytest.raises(C.UsageError, match=r"trained on different backbones .*seed=8"):
        C.backbone_spec([tmp_path / "a.st", tmp_path / "b.st"])
    _tuned(tmp_path / "c.st", _record(checkpoint=str(tmp_path / "gone.pth")))
    with pytest.raises(C.UsageError, match=r"backbone checkpoint .*gone.pth \(recorded in the tuned file\) not found"):
        C.backbone_spec([tmp_path / "c.st"])
    with pytest.raises(C.UsageError, match=r"--checkpoint .*nope.pth: no such file"):
        C.backbone_spec([tmp_path / "a.st"], checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(C.UsageError, match=r"--tuned .*missing.st: no such file"):
        C.backbone_spec([tmp_path / "missing.st"])


def test_rebuild_encoder_from_the_file_alone(tmp_path):
    enc = _tuned(tmp_path / "a.st", _record(epoch=2))
    rebuilt, config, record = C.rebuild_encoder(tmp_path / "a.st")
    assert config == enc.config() and record["epoch"] == 2
    assert same_backbone(rebuilt.vit, enc.vit)                     # the recorded seed rebuilds the random init
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(images), enc.eval()(images), atol=0, rtol=0)


def test_rebuild_encoder_loads_the_recorded_checkpoint(tmp_path):
    source = make_vit()
    with torch.no_grad():
        source.pos_embed.normal_()
    torch.save({"model": source.state_dict()}, tmp_path / "mae.pth")
    record = _record(checkpoint=str(tmp_path / "mae.pth"))
    _tuned(tmp_path / "a.st", record, vit=make_vit())
    rebuilt, _, _ = C.rebuild_encoder(tmp_path / "a.st")
    assert torch.equal(rebuilt.vit.pos_embed, source.pos_embed)


def test_load_tuned_encoder_refuses_a_file_of_another_vit(tmp_path):
    _tuned(tmp_path / "a.st", vit=make_vit(embed_dim=24, depth=4, heads=3))
    with pytest.raises(C.UsageError, match=r"--tuned .*a.st was tuned on a different ViT \(embed_dim=24, depth=4\) "
                                           r"than the one given \(embed_dim=32, depth=3\)"):
        C.load_tuned_encoder(tmp_path / "a.st", make_vit())


# --- numbers and booleans ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, bounds, message", [
    (float("nan"), dict(gt=0), r"--x must be a finite number > 0, got nan"),
    (float("inf"), dict(gt=0), r"--x must be a finite number > 0, got inf"),
    (float("-inf"), {}, r"--x must be a finite number, got -inf"),
    (-0.5, dict(ge=0, lt=1), r"--x must be a finite number >= 0 and < 1, got -0.5"),
    (1.0, dict(ge=0, lt=1), r"--x must be a finite number >= 0 and < 1, got 1.0"),
    (0, dict(ge=1), r"--x must be >= 1, got 0"),
    (True, dict(ge=0), r"--x must be a finite number >= 0, got True"),
])
def test_numbers_out_of_range_or_not_finite_are_refused(value, bounds, message):
    with pytest.raises(C.UsageError, match=message):
        C.check_number("--x", value, **bounds)


@pytest.mark.parametrize("value, bounds", [(0.5, dict(ge=0, lt=1)), (1e-9, dict(gt=0)), (3, dict(ge=1)), (-2.0, {})])
def test_numbers_in_range_pass(value, bounds):
    C.check_number("--x", value, **bounds)


@pytest.mark.parametrize("word, value", [("true", True), ("False", False), ("1", True), ("0", False), ("YES", True),
                                         ("no", False), (" true ", True)])
def test_boolean_words(word, value):
    assert C.parse_bool(word) is value


@pytest.mark.parametrize("word", ["maybe", "", "2", "t", "off"])
def test_other_words_are_not_booleans(word):
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--flag", type=C.parse_bool)
    with pytest.raises(SystemExit):
        parser.parse_args(["--flag", word])
    with pytest.raises(argparse.ArgumentTypeError, match=rf"expected true or false \(or 1/0, yes/no\), got {word!r}"):
        C.parse_bool(word)


# --- the output folder's lock --------------------------------------------------------------------------
def test_output_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with C.OutputLock(tmp_path):
        holder = (tmp_path / C.LOCK_FILE).read_text()
        assert f"pid {os.getpid()} on " in holder
        with pytest.raises(C.UsageError, match=rf"--output {tmp_path} is in use by another run \(pid {os.getpid()} "
                                               r"on .*\): wait until it ends, or choose another --output"):
            with C.OutputLock(tmp_path):
                pass
    assert (tmp_path / C.LOCK_FILE).read_text() == ""                # emptied, the folder as the run found it
    with C.OutputLock(tmp_path):                                      # released: the next run takes it
        pass


def test_output_lock_of_another_process(tmp_path):
    code = ("import sys; from lspt_kernels.cli_helpers import OutputLock\n"
            f"with OutputLock({str(tmp_path)!r}):\n    print('held', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(C.UsageError, match=rf"in use by another run \(pid {child.pid} on "):
            with C.OutputLock(tmp_path):
                pass
    finally:
        child.communicate("", timeout=60)
    with C.OutputLock(tmp_path):                                      # the holder is gone: free again
        pass


# --- error messages ------------------------------------------------------------------------------------
class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from lspt_kernels.data import DataError
        raise DataError(f"cannot read image /data/{i}.png: truncated")


@pytest.mark.parametrize("workers", [0, 1])
def test_error_message_of_a_loader_is_one_line_with_or_without_workers(workers):
    loader = torch.utils.data.DataLoader(_Broken(), num_workers=workers)
    with pytest.raises(ValueError) as caught:
        next(iter(loader))
    assert C.error_message(caught.value) == "cannot read image /data/0.png: truncated"


def test_error_message_of_other_errors_is_their_text():
    assert C.error_message(ValueError("a\nb")) == "a\nb"


# --- the backbone's fingerprint and image size ---------------------------------------------------------
def test_backbone_fingerprint_tells_weights_apart():
    a, b = (C.build_backbone("vit_tiny_patch16_224", 32, TINY_KW, seed=3) for _ in range(2))
    assert C.backbone_fingerprint(a) == C.backbone_fingerprint(b)
    assert C.backbone_fingerprint(a) != C.backbone_fingerprint(C.build_backbone("vit_tiny_patch16_224", 32, TINY_KW, 4))
    with torch.no_grad():
        b.blocks[1].mlp.fc2.bias[5] += 1e-6
    assert C.backbone_fingerprint(a) != C.backbone_fingerprint(b)
    assert C.backbone_fingerprint(C.build_backbone("vit_tiny_patch16_224", device="meta")) is None


def test_image_smaller_than_a_patch_is_refused():
    with pytest.raises(C.UsageError, match=r"--img-size 4: smaller than the \(8, 8\) patch of --model "
                                           r"'vit_tiny_patch16_224', so an image holds no patch"):
        C.build_backbone("vit_tiny_patch16_224", 4, TINY_KW)


# --- a tuned file's record: damaged entries, another backbone --------------------------------------------
DAMAGED_RECORDS = {        # case: (the record's change, the error's pattern)
    "classes-not-a-list": (dict(classes=5), r"entry 'classes' must be a non-empty list of class names, got 5"),
    "batch-as-text": (dict(eval_batch_size="64"), r"entry 'eval_batch_size' must be an int >= 1, got \"64\""),
    "img-size-as-text": (dict(img_size="32"), r"entry 'img_size' must be an int >= 1 \(or null\), got \"32\""),
    "mean-not-numbers": (dict(mean="x"), r"entry 'mean' must be a list of numbers, got \"x\""),
    "zero-std": (dict(std=[0, 1, 1]), r"entry 'std' must be a list of numbers > 0"),
    "unknown-entry": (dict(colour="red"), r"has entries this version does not know: \['colour'\]"),
}


@pytest.mark.parametrize("case", list(DAMAGED_RECORDS))
def test_damaged_record_is_refused_naming_the_entry(tmp_path, case):
    change, pattern = DAMAGED_RECORDS[case]
    _tuned(tmp_path / "a.st", _record(**change))
    with pytest.raises(C.UsageError, match=rf"--tuned \S*a.st: its 'lspt_train' metadata {pattern}"):
        C.train_record(tmp_path / "a.st")


def test_record_that_is_not_an_object_is_damaged_not_missing(tmp_path):
    enc = _tuned(tmp_path / "a.st")
    enc.save_tuned(tmp_path / "a.st", metadata={C.TRAIN_RECORD: '{"model": "vit_tiny_patch16_224", "img_si'})
    with pytest.raises(C.UsageError, match=r"its 'lspt_train' metadata is damaged: expected a JSON object"):
        C.backbone_spec([tmp_path / "a.st"])


def _recorded_with_fingerprint(tmp_path, seed=7):
    vit = C.build_backbone("vit_tiny_patch16_224", 32, TINY_KW, seed=seed)
    _tuned(tmp_path / "a.st", _record(seed=seed, backbone_sha256=C.backbone_fingerprint(vit)), vit=vit)
    return tmp_path / "a.st", vit


def test_the_recorded_backbone_is_no_mismatch(tmp_path):
    path, vit = _recorded_with_fingerprint(tmp_path)
    spec = C.backbone_spec([path])
    assert C.backbone_mismatch(spec, C.load_backbone(spec)) is None
    torch.save({"model": vit.state_dict()}, tmp_path / "copy.pth")      # the same weights from a file
    spec = C.backbone_spec([path], checkpoint=str(tmp_path / "copy.pth"))
    assert C.backbone_mismatch(spec, C.load_backbone(spec)) is None


def test_another_backbone_is_named_with_both_values(tmp_path):
    path, _ = _recorded_with_fingerprint(tmp_path)
    spec = C.backbone_spec([path], seed=8)
    message = C.backbone_mismatch(spec, C.load_backbone(spec))
    assert "--seed 8 (lspt-train recorded 7)" in message
    assert re.search(r"its weights \(sha256 \w{16}\) are not the ones the file was tuned on \(\w{16}\)", message)


def test_rebuild_encoder_reports_another_backbone(tmp_path):
    path, _ = _recorded_with_fingerprint(tmp_path)
    other = C.build_backbone("vit_tiny_patch16_224", 32, TINY_KW, seed=8)
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    said = []
    C.rebuild_encoder(path, warn=said.append)
    assert said == []                                                   # the recorded backbone: nothing to say
    C.rebuild_encoder(path, checkpoint=str(tmp_path / "other.pth"), warn=said.append)
    assert len(said) == 1 and f"--checkpoint {tmp_path / 'other.pth'} (lspt-train recorded None)" in said[0]
    with pytest.warns(RuntimeWarning, match="the backbone is not the one the tuned file was trained on"):
        C.rebuild_encoder(path, checkpoint=str(tmp_path / "other.pth"))
