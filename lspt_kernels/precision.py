"""The precision torch computes in: the fp32 matmul precision (both of torch's APIs) and autocast.

torch has two APIs for the fp32 matmul precision: the legacy `torch.set_float32_matmul_precision`
("highest" | "high" | "medium") and, from 2.9, per backend `torch.backends.<backend>.matmul.
fp32_precision` ("ieee" | "tf32" | "bf16" | "none" = inherit from `torch.backends.fp32_precision`).
Once a user or a library sets the new API, the legacy getter raises ("mix of the legacy and new
APIs"), so every reader here goes through `float32_matmul_precision`, which reads the new API
(whose values also follow the legacy setter) and falls back to the legacy one on older torch.
"""
from __future__ import annotations

import contextlib

import torch

# The legacy words for the new API's values (what a "highest"/"high"/"medium" setting computes).
LEGACY_NAMES = {"ieee": "highest", "tf32": "high", "bf16": "medium"}
_FROM_LEGACY = {"highest": "ieee", "high": "tf32"}


def float32_matmul_precision(device_type: str = "cuda") -> str:
    """How fp32 GEMMs on `device_type` compute: "ieee" (full fp32), "tf32" or "bf16".

    device_type "cuda" reads cuBLAS' setting (the one Triton and the CUDA kernels follow), anything
    else oneDNN's (the CPU GEMMs)."""
    backends = torch.backends
    generic = getattr(backends, "fp32_precision", None)
    if generic is None:                                    # torch < 2.9: the legacy API only
        legacy = torch.get_float32_matmul_precision()
        return _FROM_LEGACY.get(legacy, "tf32" if device_type == "cuda" else "bf16")
    specific = backends.cuda.matmul if device_type == "cuda" else backends.mkldnn.matmul
    value = getattr(specific, "fp32_precision", "none")
    if value == "none":
        value = generic
    return "ieee" if value == "none" else value


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for any device type: False where autocast does not exist (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast" (meta and other non-compute devices)
        return False


def autocast_off(device_type: str):
    """A context that keeps autocast from re-casting inside a step whose dtypes are already chosen;
    a no-op (and no context cost on the hot path) where autocast is not on."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
