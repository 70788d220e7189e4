"""Compile every Triton kernel of lspt_kernels.triton_kernels for real GPU targets, without a GPU.

For each kernel, each block configuration its launcher can pick and each dtype, `triton.compile`
lowers the kernel to PTX and (with Triton's bundled ptxas) to a cubin for sm_80 and sm_90. The
interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets on machines without a GPU) is more
permissive than the compiler, so this is the check that the kernels are valid Triton for hardware.
It also checks that the fused GEMM kernels run on tensor cores (mma.sync / wgmma in the PTX) and
that ptxas needs no register spills for any configuration.

The compilation runs in worker subprocesses with TRITON_INTERPRET unset: when Triton is imported in
interpreter mode, @triton.jit (including triton.language's own jit functions such as tl.sigmoid)
builds InterpretedFunctions, which cannot be compiled, and the interpreter patches triton.language
in place while kernels run. Results land in Triton's cache (TRITON_CACHE_DIR), so a second run
takes seconds.

Run the workers by hand (e.g. to see a compiler error in full):
    python tests/test_triton_compile.py --worker cases.json out.json
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

CAPABILITIES = (80, 90)
_DT = ("fp32", "fp16", "bf16", "fp64")
# (tokens dtype, cell dtype, weight dtype W): everything in W, plus autocast (fp32 tokens and cell,
# 16-bit W) for the 16-bit weights.
DTYPE_COMBOS = [(w, w, w) for w in _DT] + [("fp32", "fp32", w) for w in ("fp16", "bf16")]
GEMM_KERNELS = ("_lstm_fwd_kernel", "_lstm_bwd_kernel", "_grouped_lstm_fwd_kernel")
ROW_KERNELS = ("_xhat_kernel", "_grad_tokens_kernel")


def _combo_id(combo):
    tok, cell, w = combo
    return f"W{w}" if tok == cell == w else f"tok{tok}-cell{cell}-W{w}"


# ----------------------------------------------------------------------------------------------
# The cases: what the launchers in triton_kernels.py can pick (read from its config tables).
# ----------------------------------------------------------------------------------------------
def _cases() -> list[dict]:
    import torch

    from lspt_kernels import triton_kernels as tk  # config tables only: plain Python
    torch_dt = dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16, fp64=torch.float64)
    cases = []
    for combo in DTYPE_COMBOS:
        tok, cell, w = combo
        for cfg_name, prec in tk.gemm_config_cases(torch_dt[w]):
            if tok != w and cfg_name != "half":
                continue  # autocast pointer types: once per kernel, with the common 16-bit config
            cfg = tk.GEMM_CONFIGS[cfg_name]
            for cap in CAPABILITIES:
                for kname in GEMM_KERNELS:
                    cases.append(dict(
                        id=f"{kname}-{_combo_id(combo)}-{cfg_name}-{prec}-sm{cap}", kind="gemm",
                        kernel=kname, combo=combo, config=cfg_name, prec=prec, cap=cap,
                        constexprs=dict(PREC=prec, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                                        BLOCK_K=cfg.BLOCK_K),
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        # configs picked for D > 64 see ViT widths, multiples of 16 (Triton's launcher
                        # specializes such ints, and aligned pointers, as divisible by 16)
                        aligned_ints=["D"] if cfg_name not in ("small", "fp64") else []))
    for combo in DTYPE_COMBOS:
        if combo[1] != combo[0]:
            continue
        for cfg_name, cfg in sorted(tk.ROW_CONFIGS.items()):
            for cap in CAPABILITIES:
                for kname in ROW_KERNELS:
                    cases.append(dict(
                        id=f"{kname}-{_combo_id(combo)}-{cfg_name}-sm{cap}", kind="row", kernel=kname,
                        combo=combo, config=cfg_name, prec=None, cap=cap,
                        constexprs=dict(BLOCK_T=cfg.BLOCK_T, BLOCK_D=cfg.BLOCK_D),
                        num_warps=cfg.num_warps, num_stages=1,
                        aligned_ints=["D", "stride_tb", "stride_tt"] if cfg_name == "wide" else []))
    return cases


# ----------------------------------------------------------------------------------------------
# Worker (a subprocess without TRITON_INTERPRET): compile cases, report facts as JSON.
# ----------------------------------------------------------------------------------------------
def _ptr_dtypes(kind, combo):
    tok, cell, w = combo
    if kind == "gemm":
        return dict(xhat_ptr=w, w_ptr=w, gb_ptr=w, dgates_ptr=w, offsets_ptr="i64",
                    cell_ptr=cell, ncell_ptr=cell, gc_ptr=cell, gcell_ptr=cell, hid_ptr=tok, gh_ptr=tok)
    return dict(tok_ptr=tok, xhat_ptr=w, dx_ptr=w, out_ptr=tok)


def _stack_bytes(triton, cubin: bytes):
    """Per-thread stack (local memory: register spills) of a cubin, from cuobjdump -res-usage."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump")
        if tool is None:
            return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"STACK:(\d+)", out)
    return int(m.group(1)) if m else None


def _compile_case(triton, tl, tk, case):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = getattr(tk, case["kernel"])
    assert isinstance(kernel, triton.runtime.JITFunction), type(kernel)
    w = case["combo"][2]
    constexprs = dict(case["constexprs"], ACC=tl.float64 if w == "fp64" else tl.float32)
    ptrs = _ptr_dtypes(case["kind"], case["combo"])
    names = list(kernel.arg_names)
    params = getattr(kernel, "params", None)
    is_const = ({p.name: bool(p.is_constexpr) for p in params} if params is not None
                else {n: n in constexprs for n in names})
    if set(constexprs) != {n for n in names if is_const[n]}:
        raise AssertionError(f"constexprs {sorted(constexprs)} do not match the kernel's "
                             f"{sorted(n for n in names if is_const[n])}")
    # Signature built from the kernel's own argument names: pointers by name, other ints i32.
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if is_const[name]:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in case["aligned_ints"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    # Tuple keys (argument index) are what Triton 3.3-3.9 all accept for constexprs.
    # (fn, signature, constexprs, attrs) positionally: the third parameter's name changed across
    # Triton versions (constants -> constexprs).
    src = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()}, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", case["cap"], 32),
                              options={"num_warps": case["num_warps"], "num_stages": case["num_stages"],
                                       "enable_fp_fusion": True})
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    return dict(
        ok=True,
        target=(re.search(r"\.target\s+(sm_\w+)", ptx) or [None, None])[1] if ptx else None,
        ptx_chars=len(ptx), cubin_bytes=len(cubin) if isinstance(cubin, bytes) else 0,
        wgmma=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.\w+\.\w+\.\w+)", ptx))),
        mma=sorted(set(re.findall(r"mma\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
        shared=getattr(compiled.metadata, "shared", None),
        stack=_stack_bytes(triton, cubin) if isinstance(cubin, bytes) else None)


def _worker(cases_path: str, out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "worker must run without the interpreter"
    import triton
    import triton.language as tl

    from lspt_kernels import triton_kernels as tk
    with open(cases_path) as f:
        cases = json.load(f)
    results = {}
    for case in cases:
        t0 = time.perf_counter()
        try:
            results[case["id"]] = _compile_case(triton, tl, tk, case)
            results[case["id"]]["seconds"] = round(time.perf_counter() - t0, 2)
        except Exception:  # reported by the test of that case
            results[case["id"]] = dict(ok=False, error=traceback.format_exc()[-4000:])
        with open(out_path, "w") as f:  # after every case: a crash still leaves the rest
            json.dump(results, f)


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------
def _ptxas_env() -> dict | None:
    """Environment for the workers, or None without any ptxas. Triton uses its bundled ptxas; a
    CUDA toolkit's is the fallback (TRITON_PTXAS_PATH) for a wheel that lacks it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        import triton
    except ImportError:
        return None
    nv = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if os.path.exists(os.path.join(nv, "ptxas")) or env.get("TRITON_PTXAS_PATH"):
        return env
    for cand in ("/usr/local/cuda/bin/ptxas", shutil.which("ptxas")):
        if cand and os.path.exists(cand):
            env["TRITON_PTXAS_PATH"] = cand
            env["TRITON_PTXAS_BLACKWELL_PATH"] = env.get("TRITON_PTXAS_BLACKWELL_PATH", cand)
            return env
    return None


CASES = _cases() if _ptxas_env() is not None else []


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = _ptxas_env()
    if env is None:
        pytest.skip("no Triton or no ptxas (neither Triton's bundled one nor a CUDA toolkit's)")
    tmp = tmp_path_factory.mktemp("triton_compile")
    # One worker per two cores: LLVM and ptxas use more than one thread.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    n = max(1, min(cores // 2, 8))
    # Deal the expensive GEMM cases round-robin so that the workers finish together.
    ordered = sorted(CASES, key=lambda c: c["kind"] != "gemm")
    procs = []
    for i in range(n):
        chunk = ordered[i::n]
        if not chunk:
            continue
        cases_path, out_path = tmp / f"cases{i}.json", tmp / f"out{i}.json"
        cases_path.write_text(json.dumps(chunk))
        log = open(tmp / f"log{i}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                        str(cases_path), str(out_path)],
                                       env=env, stdout=log, stderr=subprocess.STDOUT), out_path, log, i))
    results = {}
    for proc, out_path, log, i in procs:
        try:
            proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if out_path.exists():
            results.update(json.loads(out_path.read_text()))
        if proc.returncode != 0:
            results.setdefault("__worker_errors__", []).append(
                f"worker {i} exited with {proc.returncode}: " + (tmp / f"log{i}.txt").read_text()[-3000:])
    return results


def _result(compiled, case):
    res = compiled.get(case["id"])
    if res is None:
        pytest.fail(f"no result for {case['id']}: " + "\n".join(compiled.get("__worker_errors__", [])))
    if not res["ok"]:
        pytest.fail(f"{case['id']} failed to compile:\n{res['error']}")
    return res


def _check_binary(case, res):
    assert res["target"] == f"sm_{case['cap']}a" or res["target"] == f"sm_{case['cap']}", res["target"]
    assert res["ptx_chars"] > 0 and res["cubin_bytes"] > 0, "no PTX or no cubin"
    if res["stack"] is not None:
        assert res["stack"] == 0, f"ptxas spilled registers: {res['stack']} bytes of stack per thread"


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "gemm"], ids=lambda c: c["id"])
def test_compile_gemm_kernel(compiled, case):
    res = _result(compiled, case)
    _check_binary(case, res)
    w, prec, cap = case["combo"][2], case["prec"], case["cap"]
    tensor_cores = bool(res["wgmma"] or res["mma"])
    if w in ("fp16", "bf16") or (w == "fp32" and prec == "tf32"):
        assert tensor_cores, "tl.dot did not lower to tensor-core instructions (mma / wgmma)"
    if w == "fp32" and prec == "ieee":
        assert not tensor_cores, "an ieee fp32 product must not run on (tf32) tensor cores"
    if cap == 90 and w in ("fp16", "bf16") and case["config"] != "small":
        # Hopper: the 64+-row tiles use warpgroup MMA, not the sm_80 mma.sync path.
        ptx_ty = {"fp16": "f16", "bf16": "bf16"}[w]
        assert any(s.endswith(f"f32.{ptx_ty}.{ptx_ty}") for s in res["wgmma"]), res["wgmma"]


def test_sm90_bf16_fused_gemm_uses_wgmma(compiled):
    """The headline check: the bf16 fused forward at ViT widths on Hopper runs on wgmma."""
    hits = [c for c in CASES if c["kernel"] == "_lstm_fwd_kernel" and c["combo"] == ("bf16",) * 3
            and c["cap"] == 90 and c["config"] in ("half", "half_large")]
    assert {c["config"] for c in hits} == {"half", "half_large"}
    for case in hits:
        res = _result(compiled, case)
        assert any(re.fullmatch(r"m64n\d+k16\.f32\.bf16\.bf16", s) for s in res["wgmma"]), res


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "row"], ids=lambda c: c["id"])
def test_compile_row_kernel(compiled, case):
    _check_binary(case, _result(compiled, case))


def test_every_launch_config_is_covered():
    """The launchers pick configurations only from the tables this file compiles."""
    if not CASES:
        pytest.skip("no Triton or no ptxas")
    import torch

    from lspt_kernels import triton_kernels as tk
    picked = set()
    for w in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for prec in ("ieee", "tf32"):
            if w != torch.float32 and prec != tk.dot_precision(w):
                continue
            for D in range(1, 2100, 7):
                for M in (1, 100, 2047, 2048, 50000):
                    picked.add((tk.gemm_config_name(M, D, w, prec), prec))
    compiled_cases = {(c["config"], c["prec"]) for c in CASES if c["kind"] == "gemm"}
    assert picked <= compiled_cases
    assert {tk.row_config_name(D) for D in range(1, 3000)} <= {c["config"] for c in CASES if c["kind"] == "row"}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} --worker CASES_JSON OUT_JSON")
