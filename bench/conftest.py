"""pytest-benchmark suites of lspt_kernels: configuration shared by bench/test_*.py.

    pytest bench/ --benchmark-only                 # the full suites (ViT-B/16 sizes), timed
    pytest bench/ --benchmark-only --benchmark-json out.json && python bench/plot_results.py out.json
    python -m pytest tests bench --benchmark-disable -q   # CI: every benchmark once, tiny sizes

Size: "full" when --benchmark-only is given (or --lspt-size full), else "tiny": a small random ViT
and small shapes, so the plain test command runs each benchmark once in seconds and still checks
its result. Full sizes default to the paper's on a GPU (batch 64, Np 10 and 100, fp32 and bf16)
and to what a CPU can do in minutes on the CPU; the --lspt-* options override them.
"""
import os

import torch

# Without a GPU, the Triton backend runs in the interpreter; chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Full sizes per device. Tiny: the same code paths on a 2-block, 32-wide ViT at 32 px.
FULL = {
    "cuda": dict(model="vit_base_patch16_224", model_kwargs={}, batch_sizes=[64], num_prompts=[10, 100],
                 dtypes=["fp32", "bf16"], rounds=20, warmup=5, num_classes=200, compile_backend="inductor",
                 step_batch_sizes=[8, 64], step_num_prompts=[10, 100], step_dims=dict(num_patches=196, dim=768)),
    "cpu": dict(model="vit_base_patch16_224", model_kwargs={}, batch_sizes=[4], num_prompts=[10, 100],
                dtypes=["fp32"], rounds=3, warmup=1, num_classes=200, compile_backend="inductor",
                step_batch_sizes=[8, 64], step_num_prompts=[10, 100], step_dims=dict(num_patches=196, dim=768)),
}
TINY = dict(model="vit_tiny_patch16_224",
            model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
            batch_sizes=[2], num_prompts=[3], dtypes=["fp32"], rounds=1, warmup=1, num_classes=5,
            # aot_eager traces forward and backward like inductor, without its minutes of C++ compiling
            compile_backend="aot_eager",
            step_batch_sizes=[2], step_num_prompts=[3], step_dims=dict(num_patches=16, dim=32))


def pytest_addoption(parser):
    g = parser.getgroup("lspt-bench", "lspt_kernels benchmark suites (bench/)")
    g.addoption("--lspt-size", choices=["auto", "tiny", "full"], default="auto",
                help="auto: full with --benchmark-only, tiny otherwise")
    g.addoption("--lspt-model", default=None, help="timm ViT name of the encoder suite (full size)")
    g.addoption("--lspt-batch-sizes", default=None, help="comma-separated batch sizes")
    g.addoption("--lspt-num-prompts", default=None, help="comma-separated Np values")
    g.addoption("--lspt-dtypes", default=None, help="comma-separated: fp32, bf16, fp16")
    g.addoption("--lspt-rounds", type=int, default=None, help="timed rounds per benchmark")


def _opt(config, name, default=None):
    try:
        return config.getoption(name)
    except ValueError:       # this conftest was not loaded at start-up: options not registered
        return default


def bench_size(config) -> str:
    size = _opt(config, "--lspt-size", "auto")
    if size != "auto":
        return size
    session = getattr(config, "_benchmarksession", None)
    disabled = session.disabled if session is not None else _opt(config, "--benchmark-disable", False)
    return "full" if _opt(config, "--benchmark-only", False) and not disabled else "tiny"


def bench_config(config) -> dict:
    size = bench_size(config)
    cfg = dict(TINY if size == "tiny" else FULL[DEVICE], size=size, device=DEVICE)
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    if _opt(config, "--lspt-model"):
        cfg.update(model=_opt(config, "--lspt-model"), model_kwargs={})
    if _opt(config, "--lspt-batch-sizes"):
        cfg["batch_sizes"] = cfg["step_batch_sizes"] = ints(_opt(config, "--lspt-batch-sizes"))
    if _opt(config, "--lspt-num-prompts"):
        cfg["num_prompts"] = cfg["step_num_prompts"] = ints(_opt(config, "--lspt-num-prompts"))
    if _opt(config, "--lspt-dtypes"):
        cfg["dtypes"] = [v.strip() for v in _opt(config, "--lspt-dtypes").split(",") if v.strip()]
    if _opt(config, "--lspt-rounds"):
        cfg["rounds"] = _opt(config, "--lspt-rounds")
    return cfg


def pytest_generate_tests(metafunc):
    """Parametrise the suites over the configured sizes (decided at collection time)."""
    cfg = bench_config(metafunc.config)
    step = metafunc.function.__name__.startswith("test_step")
    for name, key in (("batch_size", "step_batch_sizes" if step else "batch_sizes"),
                      ("num_prompts", "step_num_prompts" if step else "num_prompts"),
                      ("dtype", "dtypes")):
        if name in metafunc.fixturenames:
            prefix = {"batch_size": "B", "num_prompts": "Np", "dtype": ""}[name]
            metafunc.parametrize(name, cfg[key], ids=[f"{prefix}{v}" for v in cfg[key]])
    if "step_backend" in metafunc.fixturenames:
        metafunc.parametrize("step_backend", step_backends(cfg))


def step_backends(cfg) -> list[str]:
    """`lspt-bench step`'s backends for the device; tiny size without a GPU adds "triton"
    (the interpreter: checked, not worth timing)."""
    from lspt_kernels.bench.step import default_backends
    names = default_backends(cfg["device"])
    if cfg["size"] == "tiny" and cfg["device"] == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        names = names + ["triton"]
    return names


@pytest.fixture(scope="session")
def cfg(request):
    return bench_config(request.config)


def pytest_report_header(config):
    cfg = bench_config(config)
    return (f"lspt bench: size {cfg['size']} on {cfg['device']}; encoder {cfg['model']} batch {cfg['batch_sizes']} "
            f"Np {cfg['num_prompts']} {cfg['dtypes']}, {cfg['rounds']} rounds")
