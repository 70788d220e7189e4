"""The fused step's input contract (lspt_kernels/ops.py's docstring), checked in one place.

Errors name the argument and what was expected, before any kernel runs. Callers: the encoder (once
per forward signature), `lspt_step` (its own arguments, per call), and the Triton launchers, which
a direct torch.ops.lspt.* call reaches without the other two (the C++ kernels have csrc/checks.h).
"""
from __future__ import annotations

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HALF = (torch.float16, torch.bfloat16)


def _check_tensors(named: dict, fn: str = "lspt_step") -> None:
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{fn}: {name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in named.items())
        raise ValueError(f"{fn}: all tensors must be on one device, got {where}")


def _check_prefix(num_prefix_tokens, n_p: int, T: int, fn: str = "lspt_step") -> None:
    """The one rule for num_prefix_tokens (every backend): an int >= 0, not a bool, leaving patches."""
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"{fn}: num_prefix_tokens must be an int >= 0 (not a bool), got {num_prefix_tokens!r}")
    if num_prefix_tokens + n_p >= T:
        raise ValueError(f"{fn}: tokens has T={T} tokens but num_prefix_tokens + Np = "
                         f"{num_prefix_tokens} + {n_p} leaves no patch token (need T > k + Np)")


def _check_tokens_and_cell(tokens: Tensor, cell: Tensor, num_prefix_tokens,
                           fn: str = "lspt_step") -> tuple[int, int, int, int]:
    """(B, T, D, Np) of tokens (B, T, D) and cell (B, Np, D)."""
    if tokens.dim() != 3:
        raise ValueError(f"{fn}: tokens must be (B, T, D), got shape {tuple(tokens.shape)}")
    B, T, D = tokens.shape
    if cell.dim() != 3 or cell.shape[0] != B or cell.shape[2] != D:
        raise ValueError(f"{fn}: cell must be (B, Np, D) with B={B}, D={D} (from tokens), got "
                         f"{tuple(cell.shape)}")
    n_p = cell.shape[1]
    if n_p < 1:
        raise ValueError(f"{fn}: cell must hold at least one prompt token (Np >= 1)")
    _check_prefix(num_prefix_tokens, n_p, T, fn)
    return B, T, D, n_p


def _check_activation_dtypes(tokens: Tensor, cell: Tensor, w: torch.dtype, autocast: bool,
                             fn: str = "lspt_step") -> None:
    if not autocast and tokens.dtype != w:
        raise TypeError(f"{fn}: tokens ({tokens.dtype}) and the LSTM weights ({w}) must share one "
                        "dtype outside torch.autocast")
    if autocast and tokens.dtype not in (w, torch.float32):
        raise TypeError(f"{fn}: under autocast tokens must be float32 or {w}, got {tokens.dtype}")
    if cell.dtype not in (tokens.dtype, torch.float32):
        raise TypeError(f"{fn}: cell must be {tokens.dtype} (like tokens) or float32, got {cell.dtype}")


def _check_params(gate_bias: Tensor, weight_hh: Tensor, B: int, n_p: int, D: int) -> None:
    if tuple(weight_hh.shape) != (4 * D, D):
        raise ValueError(f"lspt_step: weight_hh must be (4D, D) = {(4 * D, D)} for D={D} (from tokens), got "
                         f"{tuple(weight_hh.shape)}")
    if tuple(gate_bias.shape) not in ((n_p, 4 * D), (B, n_p, 4 * D)):
        raise ValueError(f"lspt_step: gate_bias must be (Np, 4D) = {(n_p, 4 * D)} or (B, Np, 4D) = "
                         f"{(B, n_p, 4 * D)}, got {tuple(gate_bias.shape)}")
    if gate_bias.dtype != weight_hh.dtype:
        raise TypeError(f"lspt_step: gate_bias ({gate_bias.dtype}) and weight_hh ({weight_hh.dtype}) "
                        "must share one dtype")
    if not (gate_bias.is_contiguous() and weight_hh.is_contiguous()):
        raise ValueError("lspt_step: the fused op needs contiguous gate_bias and weight_hh")


def check_fused_inputs(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, *, autocast: bool = False) -> None:
    """The op's forward inputs. autocast: tokens may be fp32 with a 16-bit weight dtype W."""
    _check_tensors(dict(tokens=tokens, cell=cell, gate_bias=gate_bias, weight_hh=weight_hh))
    B, T, D, n_p = _check_tokens_and_cell(tokens, cell, num_prefix_tokens)
    _check_params(gate_bias, weight_hh, B, n_p, D)
    _check_activation_dtypes(tokens, cell, weight_hh.dtype, autocast)
    if tokens.stride(-1) != 1 or not cell.is_contiguous():
        raise ValueError("lspt_step: the fused op needs tokens with stride(-1) == 1 and a contiguous cell")


def check_grouped_inputs(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens, *,
                         autocast: bool = False) -> None:
    """The grouped op's inputs (ops.grouped_step): shapes, dtypes, devices, layout, and offsets'
    dtype / shape / device. The VALUES of offsets (0 = offsets[0] <= ... <= offsets[G] = B) need a
    device sync to read: `check_group_offsets` does that, outside a trace."""
    fn = "grouped_step"
    _check_tensors(dict(tokens=tokens, cell=cell, gate_bias=gate_bias, weight_hh=weight_hh), fn)
    B, T, D, n_p = _check_tokens_and_cell(tokens, cell, num_prefix_tokens, fn)
    if weight_hh.dim() != 3 or tuple(weight_hh.shape[1:]) != (4 * D, D) or weight_hh.shape[0] < 1:
        raise ValueError(f"{fn}: weight_hh must be (G, 4D, D) with G >= 1 and (4D, D) = {(4 * D, D)} for D={D} "
                         f"(from tokens), got {tuple(weight_hh.shape)}")
    if tuple(gate_bias.shape) != (B, n_p, 4 * D):
        raise ValueError(f"{fn}: gate_bias must be (B, Np, 4D) = {(B, n_p, 4 * D)} (each row's own task's "
                         f"rows), got {tuple(gate_bias.shape)}")
    if gate_bias.dtype != weight_hh.dtype:
        raise TypeError(f"{fn}: gate_bias ({gate_bias.dtype}) and weight_hh ({weight_hh.dtype}) must share one dtype")
    _check_activation_dtypes(tokens, cell, weight_hh.dtype, autocast, fn)
    for name, t in (("cell", cell), ("gate_bias", gate_bias), ("weight_hh", weight_hh)):
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous")
    if tokens.stride(-1) != 1:
        raise ValueError(f"{fn}: tokens must have stride(-1) == 1, got strides {tuple(tokens.stride())}")
    G = weight_hh.shape[0]
    if not isinstance(offsets, Tensor):
        raise TypeError(f"{fn}: offsets must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"{fn}: offsets must be int64, got {offsets.dtype}")
    if tuple(offsets.shape) != (G + 1,):
        raise ValueError(f"{fn}: offsets must be (G + 1,) = {(G + 1,)} for G={G} groups (from weight_hh), got "
                         f"shape {tuple(offsets.shape)}")
    if offsets.device != tokens.device:
        raise ValueError(f"{fn}: offsets must be on the tokens' device {tokens.device}, got {offsets.device}")


def check_group_offsets(offsets: Tensor, batch: int) -> None:
    """offsets' values: 0 = offsets[0] <= ... <= offsets[G] = batch. Reads them on the host (one
    device sync); the kernels clamp every segment to [0, B] anyway, so no value reads out of bounds."""
    ok = bool(((offsets[0] == 0) & (offsets[-1] == batch) & (offsets[1:] >= offsets[:-1]).all()).item())
    if not ok:
        shown = offsets.tolist() if offsets.numel() <= 16 else f"{offsets[:16].tolist()}..."
        raise ValueError(f"grouped_step: offsets must start at 0, never decrease and end at B={batch} (rows "
                         f"offsets[g]:offsets[g+1] use weight_hh[g]), got {shown}")


def check_step_inputs(tokens, cell, prompt, weight_ih, weight_hh, bias_ih, bias_hh, num_prefix_tokens, *,
                      autocast: bool = False) -> None:
    """lspt_step's inputs: the prompt and nn.LSTMCell's four tensors (one dtype) instead of the op's
    gate-bias rows; the same rules as `check_fused_inputs` otherwise (no layout rule: lspt_step
    makes what the kernels need)."""
    named = dict(tokens=tokens, cell=cell, prompt=prompt, weight_ih=weight_ih, weight_hh=weight_hh,
                 bias_ih=bias_ih, bias_hh=bias_hh)
    _check_tensors(named)
    if tokens.dim() != 3:
        raise ValueError(f"lspt_step: tokens must be (B, T, D), got shape {tuple(tokens.shape)}")
    B, T, D = tokens.shape
    if prompt.dim() != 2 or prompt.shape[1] != D:
        raise ValueError(f"lspt_step: prompt must be (Np, D) with D={D} (from tokens), got shape {tuple(prompt.shape)}")
    n_p = prompt.shape[0]
    if tuple(cell.shape) != (B, n_p, D):
        raise ValueError(f"lspt_step: cell must be (B, Np, D) = {(B, n_p, D)}, got {tuple(cell.shape)}")
    _check_tokens_and_cell(tokens, cell, num_prefix_tokens)
    for name in ("weight_ih", "weight_hh"):
        if tuple(named[name].shape) != (4 * D, D):
            raise ValueError(f"lspt_step: {name} must be (4D, D) = {(4 * D, D)} for D={D} (from tokens), got "
                             f"{tuple(named[name].shape)}")
    for name in ("bias_ih", "bias_hh"):
        if tuple(named[name].shape) != (4 * D,):
            raise ValueError(f"lspt_step: {name} must be (4D,) = {(4 * D,)}, got {tuple(named[name].shape)}")
    w = weight_hh.dtype
    mixed = [n for n in ("prompt", "weight_ih", "bias_ih", "bias_hh") if named[n].dtype != w]
    if mixed:
        raise TypeError(f"lspt_step: prompt, weight_ih, weight_hh, bias_ih and bias_hh must share one dtype; "
                        f"weight_hh is {w} but " + ", ".join(f"{n} is {named[n].dtype}" for n in mixed))
    _check_activation_dtypes(tokens, cell, w, autocast)


def check_backward_inputs(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, num_prefix_tokens,
                          num_tokens) -> None:
    """The op's backward inputs (what lspt::step_bwd's kernels read)."""
    _check_tensors(dict(grad_hidden=grad_hidden, grad_cell=grad_cell, xhat=xhat, cell=cell, gate_bias=gate_bias,
                        weight_hh=weight_hh))
    if xhat.dim() != 3 or xhat.shape[1] < 1:
        raise ValueError(f"lspt_step: xhat must be (B, Np, D), got shape {tuple(xhat.shape)}")
    B, n_p, D = xhat.shape
    for name, t in (("grad_hidden", grad_hidden), ("grad_cell", grad_cell), ("cell", cell)):
        if tuple(t.shape) != (B, n_p, D) or not t.is_contiguous():
            raise ValueError(f"lspt_step: {name} must be a contiguous (B, Np, D) = {(B, n_p, D)} tensor, got "
                             f"shape {tuple(t.shape)}")
    if not xhat.is_contiguous():
        raise ValueError("lspt_step: xhat must be contiguous")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise ValueError(f"lspt_step: num_tokens must be an int, got {num_tokens!r}")
    _check_prefix(num_prefix_tokens, n_p, num_tokens)
    _check_params(gate_bias, weight_hh, B, n_p, D)
    _check_activation_dtypes(grad_hidden, cell, weight_hh.dtype, autocast=weight_hh.dtype in HALF)
    if xhat.dtype != weight_hh.dtype:
        raise TypeError(f"lspt_step: xhat ({xhat.dtype}) must have the weights' dtype {weight_hh.dtype}")
    if grad_cell.dtype != cell.dtype:
        raise TypeError(f"lspt_step: grad_cell ({grad_cell.dtype}) must have the cell's dtype {cell.dtype}")
