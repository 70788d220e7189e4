"""File paths of load_backbone_checkpoint, from_timm(checkpoint=...), save_tuned and load_tuned: str or
os.PathLike with '~' expanded; bytes, None, other types and an empty string refused by name."""
import os

import pytest
import torch
from helpers import make_vit, noisy_vit, same_backbone, zeroed_vit

from lspt_kernels import LinearProbe, VPTEncoder, from_timm, load_backbone_checkpoint
from lspt_kernels.checkpoints import as_path

NP, NC = 2, 3


@pytest.fixture(scope="module")
def source():
    return noisy_vit()


class _PathLike:
    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return os.fspath(self.path)


def test_paths_expand_home_and_accept_pathlike(tmp_path, monkeypatch, source):
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(source.state_dict(), tmp_path / "ck.pth")
    for path in ("~/ck.pth", _PathLike("~/ck.pth"), tmp_path / "ck.pth"):
        assert same_backbone(load_backbone_checkpoint(zeroed_vit(), path), source)
    enc = from_timm(zeroed_vit(), checkpoint="~/ck.pth", method="vpt-deep", num_prompts=NP, num_classes=NC)
    assert same_backbone(enc.vit, source)

    enc.save_tuned("~/tuned.safetensors")
    assert (tmp_path / "tuned.safetensors").is_file()
    other = VPTEncoder(make_vit(), NP, NC)
    other.load_tuned(_PathLike("~/tuned.safetensors"))
    assert torch.equal(other.prompts, enc.prompts)


@pytest.mark.parametrize("bad, kind", [(b"/tmp/ck.pth", "bytes"), (3, "int"), (None, "NoneType"),
                                       (_PathLike(b"/tmp/ck.pth"), "bytes")])
def test_paths_of_other_types_refused(tmp_path, monkeypatch, bad, kind):
    monkeypatch.chdir(tmp_path)
    msg = rf"must be a file path \(str or os.PathLike\), got {kind}"
    with pytest.raises(TypeError, match="path " + msg):
        load_backbone_checkpoint(make_vit(), bad)
    if bad is not None:                                  # checkpoint=None means "no checkpoint"
        with pytest.raises(TypeError, match="checkpoint " + msg):
            from_timm(make_vit(), checkpoint=bad, num_prompts=NP, num_classes=NC)
    enc = VPTEncoder(make_vit(), NP, NC)
    with pytest.raises(TypeError, match="path " + msg):
        enc.save_tuned(bad)
    with pytest.raises(TypeError, match="path " + msg):
        enc.load_tuned(bad)
    assert list(tmp_path.iterdir()) == []                # nothing written under a name like "b'...'"


def test_bytes_path_hint_and_empty_path():
    with pytest.raises(TypeError, match="decode it with os.fsdecode"):
        as_path(b"x.pth")
    with pytest.raises(ValueError, match="checkpoint must be a file path, got an empty string"):
        as_path("", "checkpoint")


def test_save_tuned_into_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"directory .*nope does not exist"):
        VPTEncoder(make_vit(), NP, NC).save_tuned(tmp_path / "nope" / "t.safetensors")


def test_linear_probe_accepts_the_same_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    probe = LinearProbe(make_vit(), NC)
    probe.save_tuned(os.path.join("~", "probe.safetensors"))
    LinearProbe(make_vit(), NC).load_tuned("~/probe.safetensors")


@pytest.mark.parametrize("where", [".", "sub"])
def test_save_tuned_to_a_directory_names_it(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(IsADirectoryError, match=rf"cannot write {where}: it is a directory; give a file name"):
        VPTEncoder(make_vit(), NP, NC).save_tuned(where)
