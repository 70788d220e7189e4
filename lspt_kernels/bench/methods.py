"""The benchmark's method names: the encoder table (lspt_kernels.encoders.METHODS) plus LSPT variants.

Every encoder the benchmark builds comes from `lspt_kernels.encoders.build_encoder`, the table
`from_timm` uses too; a method added to that table appears here without a change. "lspt" is
benchmarked as three rows: the pure-PyTorch step ("lspt-reference", alias "lspt-eager"), the fused
op with backend "auto" resolved for the device ("lspt-fused", alias "lspt"), and torch.compile of
the fused model ("lspt-compile").
"""
from __future__ import annotations

LSPT_VARIANTS = ("lspt-reference", "lspt-fused", "lspt-compile")
ALIASES = {"lspt-eager": "lspt-reference", "lspt": "lspt-fused"}
_LABELS = {
    "linear": "Linear probe",
    "vpt-shallow": "VPT-Shallow",
    "vpt-deep": "VPT-Deep",
    "gapt": "GaPT",
    "adapter": "Adapter",
    "lspt-reference": "LSPT (reference)",
    "lspt-fused": "LSPT (fused)",
    "lspt-compile": "LSPT (fused, compiled)",
}


def bench_methods() -> list[str]:
    """Every method row, in the encoder table's order, "lspt" expanded into its variants."""
    from ..encoders import METHODS
    out: list[str] = []
    for name in METHODS:
        out.extend(LSPT_VARIANTS if name == "lspt" else (name,))
    return out


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def label(method: str) -> str:
    return _LABELS.get(method, method)


def is_fused(method: str) -> bool:
    return method in ("lspt-fused", "lspt-compile")


def encoder_method(method: str) -> str:
    """The encoder table's name for a bench row ("lspt-fused" -> "lspt")."""
    return "lspt" if method in LSPT_VARIANTS else method


def make_encoder(method: str, vit, *, num_prompts: int, num_classes: int, fused_backend: str = "auto",
                 grad_checkpointing: bool = False):
    """The encoder of a bench row around `vit` (through lspt_kernels.encoders.build_encoder)."""
    from ..encoders import build_encoder
    kwargs = dict(num_prompts=num_prompts, num_classes=num_classes)
    if method == "lspt-reference":
        kwargs["backend"] = "reference"
    elif is_fused(method):
        kwargs["backend"] = fused_backend
    enc = build_encoder(encoder_method(method), vit, **kwargs)
    if grad_checkpointing:
        enc.set_grad_checkpointing(True)
    return enc


def fused_backend(device: str) -> tuple[str, str | None]:
    """The backend "auto" resolves to on `device`, and why no fused one is used (or None)."""
    import warnings

    import torch

    from ..backends import AUTO_ORDER, resolve, unavailable_reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = resolve("auto", torch.device(device))
    if name != "eager":
        return name, None
    order = AUTO_ORDER.get(torch.device(device).type, ())
    if not order:
        return name, f"'auto' picks the eager step on {torch.device(device).type} (backends.AUTO_ORDER)"
    return name, "no fused backend: " + "; ".join(f"{n}: {short_reason(unavailable_reason(n))}" for n in order)


def short_reason(reason: str | None, limit: int = 300) -> str:
    """The first line of a (possibly long, compiler-log) reason, plus its first 'error:' line."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    if not lines:
        return str(reason)
    out = lines[0] if len(lines[0]) <= 120 else lines[0][:117] + "..."
    err = next((ln for ln in lines[1:] if "error:" in ln.lower()), None)
    if err:
        out += " ... " + err
    return out if len(out) <= limit else out[:limit - 3] + "..."
