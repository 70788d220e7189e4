"""The registered op on its own, in fresh processes: a direct torch.ops.lspt.* call, a torch.export-ed
model saved, loaded and run, and torch.compile(fullgraph=True) of an encoder, each without anything
having loaded the backend first (the op loads it; Dynamo never traces the loading)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers import make_vit, need_backend

from lspt_kernels import LSPTEncoder

ROOT = Path(__file__).resolve().parent.parent


def _run_fresh(code: str, tmp_path: Path) -> str:
    """Run `code` in a fresh interpreter that imports this checkout's package."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"fresh process failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_direct_op_call_in_a_fresh_process(tmp_path):
    need_backend("cpu")
    out = _run_fresh("""
        import torch
        import lspt_kernels.ops as ops          # defines the op; loads no backend
        from lspt_kernels.eager import step_eager
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("lspt::step_fwd", "CPU")
        g = torch.Generator().manual_seed(0)
        B, Np, N, D, k = 2, 3, 5, 8, 1
        tokens = torch.randn(B, k + Np + N, D, generator=g)
        cell = torch.randn(B, Np, D, generator=g)
        gate_bias = torch.randn(Np, 4 * D, generator=g)
        w_hh = torch.randn(4 * D, D, generator=g) * D ** -0.5
        h, c, xhat, gates = torch.ops.lspt.step_fwd(tokens, cell, gate_bias, w_hh, k, True, "cpu")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("lspt::step_fwd", "CPU")   # the C++ kernel
        h_ref, c_ref = step_eager(tokens, cell, gate_bias, w_hh, k)
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5)
        try:
            torch.ops.lspt.step_fwd(tokens, cell, gate_bias, w_hh, k, True, "nonsense")
        except ValueError as exc:
            print("ERR", exc)
        print("OK")
    """, tmp_path)
    assert "OK" in out
    assert "backend must be one of ('cpu', 'triton', 'cuda')" in out and "'nonsense'" in out


def test_export_save_load_in_a_fresh_process(tmp_path):
    """torch.export -> save -> load in a new process -> run: matches eager."""
    need_backend("cpu")
    model = LSPTEncoder(make_vit(), 3, 5, backend="cpu").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
        ep = torch.export.export(model, (images,))
    names = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert any("lspt.step_fwd" in str(t) for t in names), "the exported graph must hold the fused op"
    torch.export.save(ep, tmp_path / "model.pt2")
    torch.save(dict(images=images, expected=expected), tmp_path / "io.pt")
    out = _run_fresh("""
        import torch
        import lspt_kernels.ops                 # the op's definition; the backend loads itself
        ep = torch.export.load("model.pt2")
        io = torch.load("io.pt")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("lspt::step_fwd", "CPU")
        with torch.no_grad():
            got = ep.module()(io["images"])
        torch.testing.assert_close(got, io["expected"], atol=1e-5, rtol=1e-5)
        print("OK")
    """, tmp_path)
    assert "OK" in out


def test_compile_fullgraph_in_a_fresh_process(tmp_path):
    """torch.compile(LSPTEncoder(..., backend="cpu"), fullgraph=True) as the first thing a process does
    with the op: the backend loads outside Dynamo's trace (no graph break), forward and backward equal
    the eager encoder's. aot_eager traces forward and backward as inductor does, without its C++
    compile time (tests/test_compile.py runs inductor)."""
    need_backend("cpu")
    out = _run_fresh("""
        import sys, torch
        sys.path.insert(0, %r)
        from helpers import make_vit
        from lspt_kernels import LSPTEncoder
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("lspt::step_fwd", "CPU")
        model = LSPTEncoder(make_vit(), 3, 5, backend="cpu")
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(images)
        grads = torch.autograd.grad(out.square().sum(), model.trainable_parameters())
        assert torch._C._dispatch_has_kernel_for_dispatch_key("lspt::step_fwd", "CPU")
        model.backend = "eager"
        ref = model(images)
        ref_grads = torch.autograd.grad(ref.square().sum(), model.trainable_parameters())
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
        print("OK")
    """ % str(ROOT / "tests"), tmp_path)
    assert "OK" in out
