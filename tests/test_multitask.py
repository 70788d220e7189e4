"""MultiTaskEncoder: row by row, the multi-task logits equal the single-task encoder of the row's task."""
import pytest
import torch
from helpers import make_vit, need_backend, vit_images

from lspt_kernels import GaPTEncoder, LSPTEncoder, MultiTaskEncoder, VPTEncoder
from lspt_kernels.cli_helpers import TRAIN_RECORD, backbone_fingerprint
from lspt_kernels.encoders import AdapterEncoder

WIDTHS = (4, 7, 2)          # three tasks of different class counts


def _perturb(encoder, seed):
    """Every tuned tensor drawn anew (GaPT's temperatures and gates away from their init, the heads'
    biases non-zero): tasks that share nothing, so a row given another task's tensors shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if not p.requires_grad:
                continue
            if name == "temperatures":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return encoder.eval()


METHODS = {
    "lspt-eager": (lambda vit, c: LSPTEncoder(vit, 3, c, backend="eager"), "eager"),
    "lspt-eager-per-block": (lambda vit, c: LSPTEncoder(vit, 3, c, shared_lstm=False, backend="eager"), "eager"),
    "lspt-cpu": (lambda vit, c: LSPTEncoder(vit, 3, c, backend="cpu"), "cpu"),
    "lspt-cpu-per-block": (lambda vit, c: LSPTEncoder(vit, 3, c, shared_lstm=False, backend="cpu"), "cpu"),
    "gapt": (lambda vit, c: GaPTEncoder(vit, 3, c), "auto"),
    "vpt-deep": (lambda vit, c: VPTEncoder(vit, 3, c, deep=True), "auto"),
}


def _tasks(vit, method, widths=WIDTHS, seed=0):
    make, backend = METHODS[method]
    if backend == "cpu":
        need_backend("cpu")
    torch.manual_seed(seed)
    return [_perturb(make(vit, c), seed + 10 * i + 1) for i, c in enumerate(widths)], backend


def _assert_rows(mt, encoders, images, ids, atol=1e-5):
    """Each row's valid logits are its task's single-task logits; the padding is -inf."""
    out = mt(images, ids)
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else [mt.task_names.index(t) if isinstance(t, str) else t
                                                               for t in ids]
    assert out.shape == (len(ids), max(mt.num_classes))
    with torch.no_grad():
        single = {g: encoders[g](images) for g in set(ids)}
    for i, g in enumerate(ids):
        width = mt.num_classes[g]
        torch.testing.assert_close(out[i, :width], single[g][i], atol=atol, rtol=atol,
                                   msg=lambda m: f"row {i} (task {g}): {m}")
        assert torch.isneginf(out[i, width:]).all()
    return out


PATTERNS = {
    "one-task": [1, 1, 1, 1],
    "every-task": [0, 1, 2, 0, 1, 2],
    "random-order": [2, 0, 1, 1, 2, 0, 2],
    "task-without-rows": [2, 0, 0, 2],
    "one-row": [2],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_rows_equal_their_single_task_encoder(small_vit, method):
    encoders, backend = _tasks(small_vit, method)
    mt = MultiTaskEncoder.from_encoders(encoders, backend=backend)
    assert mt.vit is small_vit and mt.method == encoders[0].method and mt.num_classes == list(WIDTHS)
    for pattern, ids in PATTERNS.items():
        _assert_rows(mt, encoders, vit_images(small_vit, len(ids)), torch.tensor(ids))


def test_task_ids_as_names_ints_and_int32_give_the_same_logits():
    vit = make_vit()
    encoders, _ = _tasks(vit, "gapt")
    mt = MultiTaskEncoder.from_encoders(encoders, names=["cars", "birds", "dogs"])
    images = vit_images(vit, 4)
    out = _assert_rows(mt, encoders, images, ["dogs", "cars", "dogs", "birds"])
    for ids in ([2, 0, 2, 1], torch.tensor([2, 0, 2, 1], dtype=torch.int32)):
        torch.testing.assert_close(mt(images, ids), out, atol=0, rtol=0)
    assert mt.valid_widths(["dogs", "cars", "dogs", "birds"]).tolist() == [2, 4, 2, 7]
    parts = mt.split_logits(out, [2, 0, 2, 1])
    assert [p.shape[0] for p in parts] == [2, 4, 2, 7]
    assert all(torch.isfinite(p).all() for p in parts)


@pytest.mark.parametrize("method", ["lspt-cpu", "gapt"])
def test_autocast_rows_follow_the_single_task_encoder(method):
    """Under bf16 autocast, as the single-task encoder: the GEMMs in bf16, LSPT's cell in fp32 (one bf16
    rounding of the logits apart)."""
    vit = make_vit()
    encoders, backend = _tasks(vit, method)
    mt = MultiTaskEncoder.from_encoders(encoders, backend=backend)
    images, ids = vit_images(vit, 4), [2, 0, 1, 2]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = mt(images, ids)
        single = [encoders[g](images[i:i + 1])[0] for i, g in enumerate(ids)]
    assert out.dtype == torch.bfloat16
    for i, expected in enumerate(single):
        torch.testing.assert_close(out[i, :expected.shape[0]], expected, atol=2e-2, rtol=2e-2)


def test_features_are_each_rows_own_tasks():
    vit = make_vit()
    encoders, _ = _tasks(vit, "vpt-deep")
    mt = MultiTaskEncoder.from_encoders(encoders)
    images, ids = vit_images(vit, 3), [2, 0, 2]
    features = mt.forward_features(images, ids)
    with torch.no_grad():
        for i, g in enumerate(ids):
            torch.testing.assert_close(features[i], encoders[g].forward_features(images)[i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"logits must be forward's \(B, C_max=7\)"):
        mt.split_logits(features[:, :3], ids)


def test_inference_only_no_graph_is_recorded():
    vit = make_vit()
    mt = MultiTaskEncoder.from_encoders(_tasks(vit, "vpt-deep")[0])
    images = vit_images(vit, 2).requires_grad_()
    assert not mt(images, [0, 1]).requires_grad
    assert mt.trainable_parameters() == []


# --- tuned files ---------------------------------------------------------------------------------
def _save(encoders, tmp_path, names, record=None):
    paths = []
    for encoder, name in zip(encoders, names):
        path = tmp_path / f"{name}.safetensors"
        encoder.save_tuned(path, metadata=None if record is None else {TRAIN_RECORD: record})
        paths.append(path)
    return paths


@pytest.mark.parametrize("method", ["lspt-eager-per-block", "gapt", "vpt-deep"])
def test_from_tuned_files(tmp_path, method):
    vit = make_vit()
    encoders, backend = _tasks(vit, method)
    record = {"backbone_sha256": backbone_fingerprint(vit)}
    paths = _save(encoders, tmp_path, ["cars", "birds", "dogs"], record)
    mt = MultiTaskEncoder.from_tuned(vit, paths, backend=backend)
    assert mt.task_names == ["cars", "birds", "dogs"] and mt.vit is vit
    _assert_rows(mt, encoders, vit_images(vit, 5), torch.tensor([1, 2, 0, 2, 1]))


def test_files_of_two_backbones_are_refused_naming_the_file(tmp_path):
    vit = make_vit()
    good = _save(_tasks(vit, "vpt-deep")[0][:1], tmp_path, ["good"])
    other = make_vit(embed_dim=24, heads=3)
    wide = _save([VPTEncoder(other, 3, 5)], tmp_path, ["wide"])
    with pytest.raises(ValueError, match=r"wide\.safetensors.*embed_dim=24.*embed_dim=32"):
        MultiTaskEncoder.from_tuned(vit, good + wide)
    # Same shapes, other weights: lspt-train's recorded fingerprint tells them apart.
    twin = make_vit()
    with torch.no_grad():
        twin.blocks[0].attn.qkv.weight.add_(1.0)
    stale = _save([VPTEncoder(twin, 3, 5)], tmp_path, ["stale"], {"backbone_sha256": backbone_fingerprint(twin)})
    with pytest.raises(ValueError, match=r"stale\.safetensors.*another backbone.*sha256"):
        MultiTaskEncoder.from_tuned(vit, good + stale)
    mt = MultiTaskEncoder.from_tuned(vit, good)
    with pytest.raises(ValueError, match=r"stale\.safetensors"):
        mt.add_task(stale[0])
    assert mt.task_names == ["good"]


def test_files_of_two_methods_or_other_options_are_refused(tmp_path):
    vit = make_vit()
    first = _save([VPTEncoder(vit, 3, 5)], tmp_path, ["first"])
    gapt = _save([GaPTEncoder(vit, 3, 5)], tmp_path, ["gapt"])
    with pytest.raises(ValueError, match=r"gapt\.safetensors holds 'gapt'.*'vpt-deep'"):
        MultiTaskEncoder.from_tuned(vit, first + gapt)
    more = _save([VPTEncoder(vit, 4, 5)], tmp_path, ["more"])
    with pytest.raises(ValueError, match=r"more\.safetensors.*num_prompts=4 \(the first task has 3\)"):
        MultiTaskEncoder.from_tuned(vit, first + more)
    # Per-task options (num_classes, training-only ones) may differ.
    other = _save([VPTEncoder(vit, 3, 9, prompt_dropout=0.1, head_init="official")], tmp_path, ["other"])
    assert MultiTaskEncoder.from_tuned(vit, first + other).num_classes == [5, 9]


def test_encoders_that_cannot_share_a_stack_are_refused():
    vit = make_vit()
    with pytest.raises(ValueError, match="other 'vpt-deep' options.*num_prompts=4"):
        MultiTaskEncoder.from_encoders([VPTEncoder(vit, 3, 5), VPTEncoder(vit, 4, 5)])
    with pytest.raises(ValueError, match="'gapt' encoder, the others are 'vpt-deep'"):
        MultiTaskEncoder.from_encoders([VPTEncoder(vit, 3, 5), GaPTEncoder(vit, 3, 5)])
    twin = make_vit()
    MultiTaskEncoder.from_encoders([VPTEncoder(vit, 3, 5), VPTEncoder(twin, 3, 5)])    # equal weights: accepted
    with torch.no_grad():
        twin.norm.weight.add_(1.0)
    with pytest.raises(ValueError, match="another backbone"):
        MultiTaskEncoder.from_encoders([VPTEncoder(vit, 3, 5), VPTEncoder(twin, 3, 5)])
    with pytest.raises(ValueError, match="cspc='kmeans'.*fused configuration"):
        MultiTaskEncoder.from_encoders([LSPTEncoder(vit, 3, 5, cspc="kmeans")])
    for unsupported in (AdapterEncoder(vit, 5), VPTEncoder(vit, 3, 5, deep=False)):
        with pytest.raises(ValueError, match="serves methods"):
            MultiTaskEncoder.from_encoders([unsupported])
    with pytest.raises(ValueError, match="duplicate task name 'a'"):
        MultiTaskEncoder.from_encoders([VPTEncoder(vit, 3, 5), VPTEncoder(vit, 3, 5)], names=["a", "a"])


# --- tasks at run time ---------------------------------------------------------------------------
def test_add_and_remove_tasks_at_run_time(tmp_path):
    vit = make_vit()
    encoders, backend = _tasks(vit, "lspt-eager-per-block", widths=(4, 7, 9, 2))
    weights = {n: p.data_ptr() for n, p in vit.named_parameters()}
    mt = MultiTaskEncoder.from_encoders(encoders[:2], names=["a", "b"], backend=backend)
    images, ids = vit_images(vit, 4), torch.tensor([1, 0, 0, 1])
    before = mt(images, ids)
    path = _save(encoders[2:3], tmp_path, ["c"])[0]
    assert mt.add_task(path) == 2                        # from a file; wider than the others
    assert mt.add_task(encoders[3], name="d") == 3       # from an encoder
    assert mt.task_names == ["a", "b", "c", "d"] and mt.num_classes == [4, 7, 9, 2]
    after = mt(images, ids)
    torch.testing.assert_close(after[:, :7], before, atol=1e-6, rtol=1e-6)    # other tasks unchanged
    _assert_rows(mt, encoders, vit_images(vit, 6), torch.tensor([3, 2, 0, 1, 2, 3]))
    mt.remove_task("b")
    assert mt.task_names == ["a", "c", "d"] and mt.num_classes == [4, 9, 2]
    kept = [encoders[0], encoders[2], encoders[3]]
    _assert_rows(mt, kept, vit_images(vit, 5), torch.tensor([2, 1, 0, 1, 2]))
    mt.remove_task(1)
    _assert_rows(mt, [encoders[0], encoders[3]], vit_images(vit, 3), ["d", "a", "d"])
    assert mt.vit is vit and {n: p.data_ptr() for n, p in vit.named_parameters()} == weights
    with pytest.raises(ValueError, match="unknown task 'b'"):
        mt.remove_task("b")
    with pytest.raises(ValueError, match="out of range"):
        mt.remove_task(5)
    with pytest.raises(ValueError, match="duplicate task name 'a'"):
        mt.add_task(encoders[1], name="a")
    mt.remove_task("a")
    with pytest.raises(ValueError, match="only task"):
        mt.remove_task("d")


# --- bad task ids --------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, error, match", [
    (torch.tensor([0, 3]), ValueError, r"task_ids \[3\] are out of range: there are 3 tasks"),
    (torch.tensor([-1, 0]), ValueError, r"task_ids \[-1\] are out of range"),
    ([0, 5], ValueError, "out of range"),
    (torch.tensor([0, 1, 2]), ValueError, "one entry per image: 2 images, 3 task ids"),
    ([0], ValueError, "one entry per image"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer tensor.*float32"),
    (torch.tensor([True, False]), TypeError, "integer tensor.*bool"),
    (torch.tensor([[0, 1]]), ValueError, r"\(B,\) tensor"),
    (["a", "zebra"], ValueError, r"unknown task names \['zebra'\]"),
    ([0, "b"], TypeError, r"all be task indices \(int\) or all task names"),
    ([0.0, 1.0], TypeError, "all be task indices"),
    (0, TypeError, "task_ids must be"),
])
def test_bad_task_ids_are_refused(ids, error, match):
    vit = make_vit()
    mt = MultiTaskEncoder.from_encoders(_tasks(vit, "vpt-deep")[0], names=["a", "b", "c"])
    with pytest.raises(error, match=match):
        mt(vit_images(vit, 2), ids)


# --- torch.compile / torch.export ----------------------------------------------------------------
def _grouped_op() -> bool:
    """Whether ops.grouped_step is the registered op (traceable); until then it is the eager reference,
    which reads the group offsets on the host."""
    return hasattr(torch.ops.lspt, "grouped_step")


@pytest.mark.parametrize("method", ["gapt", "vpt-deep", "lspt-cpu-per-block"])
def test_compile_with_task_ids_as_an_input(method):
    vit = make_vit()
    encoders, backend = _tasks(vit, method)
    mt = MultiTaskEncoder.from_encoders(encoders, backend=backend)
    fullgraph = not method.startswith("lspt") or _grouped_op()
    torch._dynamo.reset()
    compiled = torch.compile(mt, fullgraph=fullgraph, backend="aot_eager")
    images = vit_images(vit, 5)
    for ids in (torch.tensor([2, 0, 2, 1, 0]), torch.tensor([1, 1, 0, 0, 1])):    # same graph, other ids
        torch.testing.assert_close(compiled(images, ids), mt(images, ids), atol=1e-5, rtol=1e-5)
    mt.add_task(encoders[0], name="again")          # new stacked buffers: the compiled model follows
    ids = torch.tensor([3, 0, 3, 1, 2])
    torch.testing.assert_close(compiled(images, ids), mt(images, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["gapt", "vpt-deep", "lspt-cpu"])
def test_export_with_task_ids_as_an_input(method):
    if method.startswith("lspt") and not _grouped_op():
        pytest.skip("ops.grouped_step is still the eager reference (host-read offsets): not exportable yet")
    vit = make_vit()
    encoders, backend = _tasks(vit, method)
    mt = MultiTaskEncoder.from_encoders(encoders, backend=backend)
    images = vit_images(vit, 5)
    exported = torch.export.export(mt, (images, torch.tensor([2, 0, 2, 1, 0]))).module()
    for ids in (torch.tensor([2, 0, 2, 1, 0]), torch.tensor([0, 0, 1, 1, 1])):
        torch.testing.assert_close(exported(images, ids), mt(images, ids), atol=1e-5, rtol=1e-5)
