"""MultiTaskEncoder: many tuned tasks on one frozen backbone, served in one batch.

Each row of a batch names its task; the backbone runs once for the whole batch, and every per-task
tensor is gathered per row: the prompts, GaPT's gates and temperatures, LSPT's gate-bias rows. LSPT's
step runs grouped: the batch is sorted by task once at the start (a stable argsort), each task's rows
are one contiguous group (`offsets`), and `ops.grouped_step` applies each group's own W_hh; the logits
are put back in the caller's order at the end. The heads are padded to the widest task, (G, C_max, D)
with zero weight and -inf bias past each task's classes, so one GEMM gives every row's logits and
argmax / softmax over a row stay that row's own.

Inference only: the tasks' tensors are buffers (nothing trains), and forward runs under
torch.no_grad(). The backbone is shared, never copied: a single-task encoder built on the same `vit`
gives the same numbers (docs/method.md, "Serving many tasks").
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .backbones import run_block, run_block_with
from .cli_helpers import TRAIN_RECORD, backbone_fingerprint, load_tuned_encoder, train_record
from .contract import check_grouped_inputs
from .encoders import TRAINING_ONLY_OPTIONS, GaPTEncoder, PromptEncoder
from .ops import fused_grouped_step, resolve_grouped_backend
from .precision import autocast_enabled
from .selfcheck import token_layout

__all__ = ["MultiTaskEncoder", "MULTITASK_METHODS"]

MULTITASK_METHODS = ("lspt", "vpt-deep", "gapt")

# Options two tasks may differ in: the head's width, and what only shaped their training.
_PER_TASK_OPTIONS = ("num_classes",) + TRAINING_ONLY_OPTIONS

# Where each per-task tensor's task axis goes when the tasks are stacked (block-major: tensor[l] is
# block l's (G, ...) stack, one index_select per row gather). GaPT's prompts (Np, D) have no block axis.
_TASK_AXIS = dict(prompts=1, gate_logits=1, temperatures=1, weight_ih=1, weight_hh=1, bias_ih=1, bias_hh=1,
                  head_weight=0, head_bias=0)


def _lspt_unsupported(encoder) -> str | None:
    if encoder.cspc == "mean" and encoder.lpc == "lstm" and encoder.lstm_layers == 1:
        return None
    return (f"LSPT with cspc={encoder.cspc!r}, lpc={encoder.lpc!r}, lstm_layers={encoder.lstm_layers} (only the "
            "fused configuration cspc='mean', lpc='lstm', lstm_layers=1 has a grouped step)")


def _task_tensors(encoder) -> dict[str, Tensor]:
    """One task's tensors, as the stack keeps them (detached; GaPT's temperatures projected into their
    range as its forward would)."""
    out = dict(prompts=encoder.prompts.detach(), head_weight=encoder.head.weight.detach(),
               head_bias=encoder.head.bias.detach())
    if encoder.method == "gapt":
        out["gate_logits"] = encoder.gate_logits.detach()
        out["temperatures"] = encoder.temperatures.detach().clamp(*GaPTEncoder.TEMPERATURE_RANGE)
    elif encoder.method == "lspt":
        cells = [encoder.lstm] if encoder.shared_lstm else [layers[0] for layers in encoder.lstm]
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            out[name] = torch.stack([getattr(c, name).detach() for c in cells])     # (1 or L-1, ...)
    return out


def _same_backbone(a: nn.Module, b: nn.Module) -> bool:
    """Two backbone objects with equal weights (their heads aside): equal fingerprints; a meta backbone
    (no weights to compare) is never equal."""
    fingerprint = backbone_fingerprint(a)
    return fingerprint is not None and fingerprint == backbone_fingerprint(b)


class MultiTaskEncoder(PromptEncoder):
    """N tuned tasks (one method: "lspt", "vpt-deep" or "gapt") on one frozen backbone.

    Build it with `from_tuned(vit, [path, ...])` (files written by `save_tuned` / lspt-train) or
    `from_encoders([encoder, ...])`. `mt(images, task_ids)` returns (B, C_max) logits: row i is task
    task_ids[i]'s head, entries past that task's class count are -inf (`split_logits` / `valid_widths`
    give each row's own width). task_ids: a (B,) integer tensor, a list of ints, or a list of task names.
    Tasks can be added and removed at run time (`add_task`, `remove_task`); indices after a removed task
    shift down by one.
    """

    def __init__(self, encoders, names=None, backend: str = "auto"):
        encoders = list(encoders)
        if not encoders:
            raise ValueError("encoders must hold at least one single-task encoder")
        first = encoders[0]
        if not isinstance(first, PromptEncoder) or first.method not in MULTITASK_METHODS:
            got = getattr(first, "method", type(first).__name__)
            raise ValueError(f"a MultiTaskEncoder serves methods {MULTITASK_METHODS}, got {got!r}")
        if first.method == "lspt" and _lspt_unsupported(first):
            raise ValueError(f"task 0: {_lspt_unsupported(first)}")
        super().__init__(first.vit, first.num_prompts, 1, pool=first.pool)
        del self.head                       # replaced by the padded per-task heads
        self.method = first.method
        self.backend = backends.canonical(backend)
        self._config = {k: v for k, v in first.config().items() if k not in _PER_TASK_OPTIONS + ("method",)}
        self._reference = first.config()     # what every task's options are checked against
        self._names: list[str] = []
        self._widths: list[int] = []
        names = [None] * len(encoders) if names is None else list(names)
        if len(names) != len(encoders):
            raise ValueError(f"names must have one name per encoder ({len(encoders)}), got {len(names)}")
        tasks = []
        for i, (encoder, name) in enumerate(zip(encoders, names)):
            name = self._new_name(name, self._names)
            self._check_encoder(encoder, f"task {name!r}")
            tasks.append(_task_tensors(encoder))
            self._names.append(name)
        self._restack(tasks)

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def from_encoders(cls, encoders, names=None, backend: str = "auto") -> "MultiTaskEncoder":
        """From in-memory single-task encoders of one method, with the same options but num_classes (and
        the training-only ones), on the same backbone object or one with equal weights. names: default
        "task0", "task1", ..."""
        return cls(encoders, names, backend)

    @classmethod
    def from_tuned(cls, vit: nn.Module, paths, names=None, backend: str = "auto") -> "MultiTaskEncoder":
        """From tuned files (`save_tuned` / lspt-train output) of one method, all tuned on `vit`; names
        default to the file stems. A file of another method, other options, or another backbone
        (embed_dim/depth, or lspt-train's recorded weights fingerprint) is refused naming the file."""
        paths = list(paths)
        if not paths:
            raise ValueError("paths must name at least one tuned file")
        if names is None:
            names = [Path(p).stem for p in paths]
        fingerprint: list = []
        reference = None
        encoders = []
        for path in paths:
            reference = _check_file(path, vit, reference, fingerprint)
            encoders.append(load_tuned_encoder(path, vit))
        return cls(encoders, names, backend)

    def _new_name(self, name, taken: list[str]) -> str:
        if name is None:
            name = next(f"task{i}" for i in range(len(taken) + 1) if f"task{i}" not in taken)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a task name must be a non-empty str, got {name!r}")
        if name in taken:
            raise ValueError(f"duplicate task name {name!r} (tasks: {taken}); pass names=[...] to tell them apart")
        return name

    def _check_encoder(self, encoder, label: str) -> None:
        """Refuse a task this stack cannot serve: another method, other structural options, another
        backbone (not the same object and not equal weights)."""
        own = self._reference
        method = getattr(encoder, "method", type(encoder).__name__)
        if not isinstance(encoder, PromptEncoder) or method != own["method"]:
            raise ValueError(f"{label} is a {method!r} encoder, the others are {own['method']!r}")
        if method == "lspt" and _lspt_unsupported(encoder):
            raise ValueError(f"{label}: {_lspt_unsupported(encoder)}")
        other = encoder.config()
        diffs = [f"{k}={other.get(k)!r} (the others have {own.get(k)!r})" for k in sorted(set(own) | set(other))
                 if k not in _PER_TASK_OPTIONS and own.get(k) != other.get(k)]
        if diffs:
            raise ValueError(f"{label} has other {method!r} options than the first task: " + "; ".join(diffs))
        if encoder.vit is not self.vit and not _same_backbone(self.vit, encoder.vit):
            raise ValueError(f"{label} is built on another backbone (different weights) than the first task; "
                             "every task must share the backbone it was tuned on")

    def _restack(self, tasks: list[dict[str, Tensor]]) -> None:
        """(Re)build the stacked buffers from per-task tensors; the heads padded to the widest task."""
        widths = [t["head_bias"].shape[0] for t in tasks]
        wide = max(widths)
        for name in tasks[0]:
            parts = [t[name] for t in tasks]
            if name in ("head_weight", "head_bias"):
                fill = 0.0 if name == "head_weight" else float("-inf")
                parts = [F.pad(p, (0, 0, 0, wide - p.shape[0]) if p.dim() == 2 else (0, wide - p.shape[0]),
                               value=fill) for p in parts]
            axis = 0 if (name == "prompts" and self.method == "gapt") else _TASK_AXIS[name]
            self.register_buffer(name, torch.stack(parts, dim=axis).contiguous(), persistent=False)
        self._widths = widths
        if self.method == "lspt":
            # P[l] W_ih^T + b_ih + b_hh of every task depends on no image, and the tasks change only here:
            # computed once per add / remove instead of per forward ((L-1) G Np 4D D multiply-adds, about
            # 3 % of ViT-B/16's forward of a batch of 64 at 64 tasks).
            with torch.no_grad():
                rows = _prompt_gates(self.prompts[1:], self.weight_ih) + self.bias_ih.unsqueeze(-2) \
                    + self.bias_hh.unsqueeze(-2)                             # (L-1, G, Np, 4D)
            self.register_buffer("gate_rows", rows.contiguous(), persistent=False)

    def _unstack(self) -> list[dict[str, Tensor]]:
        names = [n for n in _TASK_AXIS if n in self._buffers]
        tasks = []
        for g, width in enumerate(self._widths):
            task = {}
            for name in names:
                axis = 0 if (name == "prompts" and self.method == "gapt") else _TASK_AXIS[name]
                task[name] = self._buffers[name].select(axis, g)
            task["head_weight"], task["head_bias"] = task["head_weight"][:width], task["head_bias"][:width]
            tasks.append(task)
        return tasks

    # --- tasks at run time ------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self._names)

    @property
    def num_classes(self) -> list[int]:
        """Each task's class count, in task order."""
        return list(self._widths)

    @property
    def num_tasks(self) -> int:
        return len(self._widths)

    def add_task(self, path_or_encoder, name: str | None = None) -> int:
        """Add a task (a tuned file, tuned on this backbone, or a single-task encoder) without rebuilding
        the backbone; returns its index (the last). Name: default the file stem, or "task<n>"."""
        if isinstance(path_or_encoder, PromptEncoder):
            encoder = path_or_encoder
        else:
            _check_file(path_or_encoder, self.vit, self._reference, [])
            if name is None:
                name = Path(path_or_encoder).stem
            encoder = load_tuned_encoder(path_or_encoder, self.vit)
        name = self._new_name(name, self._names)
        self._check_encoder(encoder, f"task {name!r}")
        self._restack(self._unstack() + [_task_tensors(encoder)])
        self._names.append(name)
        return self.num_tasks - 1

    def remove_task(self, name_or_index) -> None:
        """Remove a task by name or index; the tasks after it move down one index. The last task stays."""
        g = self._task_index(name_or_index)
        if self.num_tasks == 1:
            raise ValueError(f"cannot remove {self._names[g]!r}: it is the only task (a MultiTaskEncoder "
                             "needs one)")
        tasks = self._unstack()
        del tasks[g]
        self._restack(tasks)
        del self._names[g]

    def _task_index(self, name_or_index) -> int:
        if isinstance(name_or_index, str):
            if name_or_index not in self._names:
                raise ValueError(f"unknown task {name_or_index!r}; the tasks are {self._names}")
            return self._names.index(name_or_index)
        if isinstance(name_or_index, bool) or not isinstance(name_or_index, int):
            raise TypeError(f"a task is named by its name (str) or index (int), got {name_or_index!r}")
        if not 0 <= name_or_index < self.num_tasks:
            raise ValueError(f"task index {name_or_index} is out of range: there are {self.num_tasks} tasks "
                             f"(0 to {self.num_tasks - 1})")
        return name_or_index

    # --- task ids -----------------------------------------------------------------------------------
    def task_indices(self, task_ids, batch: int | None = None, device=None) -> Tensor:
        """task_ids ((B,) integer tensor, list of ints, or list of task names) as a checked (B,) int64
        tensor on `device` (default: the model's). batch: the length it must have."""
        device = self.vit.patch_embed.proj.weight.device if device is None else device
        if isinstance(task_ids, (list, tuple)):
            ids = self._ids_from_list(list(task_ids))
        elif isinstance(task_ids, Tensor):
            ids = task_ids
            if ids.dim() != 1:
                raise ValueError(f"task_ids must be a (B,) tensor, got shape {tuple(ids.shape)}")
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise TypeError(f"task_ids must be an integer tensor (int64) of task indices, got {ids.dtype}")
        else:
            raise TypeError(f"task_ids must be a (B,) int64 tensor, a list of task indices or a list of task "
                            f"names, got {type(task_ids).__name__}")
        if batch is not None and ids.shape[0] != batch:
            raise ValueError(f"task_ids must have one entry per image: {batch} images, {ids.shape[0]} task ids")
        self._check_range(ids)          # where the ids are: no device sync for a list or a CPU tensor
        return ids.to(device=device, dtype=torch.int64)

    def _ids_from_list(self, items: list) -> Tensor:
        if items and all(isinstance(t, str) for t in items):
            unknown = sorted({t for t in items if t not in self._names})
            if unknown:
                raise ValueError(f"task_ids: unknown task names {unknown}; the tasks are {self._names}")
            return torch.tensor([self._names.index(t) for t in items], dtype=torch.int64)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            raise TypeError(f"task_ids must all be task indices (int) or all task names (str), got "
                            f"{sorted({type(t).__name__ for t in items})}")
        return torch.tensor(items, dtype=torch.int64)

    def _check_range(self, ids: Tensor) -> None:
        """Every id in [0, G): a ValueError listing the bad ones (one device sync for ids on a GPU)."""
        G = self.num_tasks
        if torch.compiler.is_compiling():
            # No host sync inside a graph: a device-side assertion instead of the clear error.
            torch._assert_async(((ids >= 0) & (ids < G)).all(), "task_ids out of range")
            return
        bad = (ids < 0) | (ids >= G)
        if bool(bad.any()):
            raise ValueError(f"task_ids {sorted(set(ids[bad].tolist()))} are out of range: there are {G} tasks "
                             f"(0 to {G - 1}: {self._names})")

    def valid_widths(self, task_ids) -> Tensor:
        """(B,) int64: each row's class count (the width of its valid logits)."""
        ids = self.task_indices(task_ids)
        return torch.tensor(self._widths, dtype=torch.int64, device=ids.device).index_select(0, ids)

    def split_logits(self, logits: Tensor, task_ids) -> list[Tensor]:
        """Each row's valid logits (its task's width), from `forward`'s padded (B, C_max) logits."""
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < max(self._widths):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"logits must be forward's (B, C_max={max(self._widths)}) tensor, got {got}")
        ids = self.task_indices(task_ids, logits.shape[0], device="cpu").tolist()
        return [logits[i, :self._widths[g]] for i, g in enumerate(ids)]

    # --- the forward --------------------------------------------------------------------------------
    def config(self) -> dict:
        return dict(method=self.method, tasks=self.task_names, num_classes=self.num_classes, **self._config)

    @torch.no_grad()
    def forward(self, images: Tensor, task_ids) -> Tensor:
        """(B, C_max) logits, row i from task task_ids[i]'s head; -inf past that task's class count."""
        features, ids, order = self._sorted_features(images, task_ids)
        return _unsort(self._logits(features, ids), order)

    @torch.no_grad()
    def forward_features(self, images: Tensor, task_ids) -> Tensor:
        """(B, D) features (the pooling of the last block's tokens), row i with task task_ids[i]'s prompts."""
        features, _, order = self._sorted_features(images, task_ids)
        return _unsort(features, order)

    def _sorted_features(self, images: Tensor, task_ids) -> tuple[Tensor, Tensor, Tensor]:
        """The features of the batch sorted by task (stable), the sorted task ids, and the order."""
        self.check_images(images)
        ids = self.task_indices(task_ids, images.shape[0], images.device)
        order = torch.argsort(ids, stable=True)
        ids = ids.index_select(0, order)
        # offsets[g]: the first sorted row of task g (rows of tasks < g before it); offsets[G] = B.
        offsets = torch.searchsorted(ids, torch.arange(self.num_tasks + 1, device=ids.device))
        x, _ = self._run_blocks(images.index_select(0, order), rows=dict(ids=ids, offsets=offsets))
        return self._pool(x), ids, order

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError("MultiTaskEncoder serves logits only; for dense features run a single-task "
                                  "encoder built on the same backbone")

    def save_tuned(self, path, metadata=None) -> None:
        raise NotImplementedError("a MultiTaskEncoder holds no tuned parameters of its own: save each task's "
                                  "single-task encoder (save_tuned) and rebuild with MultiTaskEncoder.from_tuned")

    def load_tuned(self, path) -> None:
        raise NotImplementedError("use MultiTaskEncoder.add_task(path) to add a tuned file as a task")

    def _logits(self, features: Tensor, ids: Tensor) -> Tensor:
        """Every task's head on every row (one GEMM), then each row's own task's (B, C_max)."""
        G, C, D = self.head_weight.shape
        B = features.shape[0]
        every = F.linear(features, self.head_weight.reshape(G * C, D), self.head_bias.reshape(G * C)).view(B, G, C)
        return every.gather(1, ids.view(B, 1, 1).expand(B, 1, C)).squeeze(1)

    # --- the hooks of the one block loop (PromptEncoder._run_blocks) --------------------------------
    def _first_prompts(self, rows=None):
        prompts = self.prompts if self.method == "gapt" else self.prompts[0]
        return prompts.index_select(0, rows["ids"])                         # (B, Np, D)

    def _init_state(self, x, rows=None):
        ids = rows["ids"]
        if self.method == "gapt":
            B = x.shape[0]
            # Per row, (B, 1, 1, 1): divides q (B, heads, T, head_dim) row by row.
            temperatures = self.temperatures.index_select(1, ids).view(self.depth, B, 1, 1, 1)
            gates = torch.sigmoid(self.gate_logits.index_select(1, ids)).to(x.dtype).view(self.depth - 1, B, 1, 1)
            return dict(temperatures=temperatures, gates=gates)
        if self.method == "lspt":
            return self._init_lspt(x, rows)
        return dict(ids=ids)

    def _init_lspt(self, x: Tensor, rows) -> dict:
        """The batch-independent half of every step's gates, each row's own task's (`gate_rows`, made by
        `_restack`), gathered: (L-1, B, Np, 4D). As LSPTEncoder: under autocast the step's GEMM runs in
        the autocast dtype and the cell is carried in fp32."""
        B, dev = x.shape[0], x.device
        autocast = autocast_enabled(dev.type)
        gemm = torch.get_autocast_dtype(dev.type) if autocast else None
        cast = (lambda t: t) if gemm is None else (lambda t: t.to(gemm))  # noqa: E731
        w_hh = cast(self.weight_hh)                                          # (1 or L-1, G, 4D, D)
        cell = torch.zeros(B, self.num_prompts, self.embed_dim, dtype=torch.float32 if autocast else x.dtype,
                           device=dev)
        gate_bias = cast(self.gate_rows.index_select(1, rows["ids"]))
        # Once per forward: every block's step has these signatures, and offsets come from searchsorted
        # over sorted ids (valid by construction: no host read of their values).
        check_grouped_inputs(x, cell, gate_bias[0], w_hh[0], rows["offsets"], self.num_prefix_tokens,
                             autocast=autocast)
        backend = resolve_grouped_backend(self.backend, dev, x.dtype, cell.dtype, w_hh.dtype, self.embed_dim,
                                          self.num_prefix_tokens, token_layout(x))
        return dict(cell=cell, gate_bias=gate_bias, w_hh=w_hh, offsets=rows["offsets"], backend=backend)

    def _run_block(self, l, block, x, rope, state):
        if self.method == "gapt":
            return run_block_with(block, x, rope, temperature=state["temperatures"][l])
        return run_block(block, x, rope)

    def _after_block(self, l, x_in, x, state):
        slot = self.prompt_slot(x)
        if self.method == "vpt-deep":
            slot.copy_(self.prompts[l + 1].index_select(0, state["ids"]).to(x.dtype))
        elif self.method == "gapt":
            slot_in = self.prompt_slot(x_in)
            slot.copy_(slot_in + state["gates"][l] * (slot - slot_in))
        else:
            w_hh = state["w_hh"][0 if state["w_hh"].shape[0] == 1 else l]
            hidden, state["cell"] = fused_grouped_step(x, state["cell"], state["gate_bias"][l], w_hh,
                                                       state["offsets"], self.num_prefix_tokens, state["backend"])
            slot.copy_(hidden)


def _prompt_gates(P: Tensor, weight_ih: Tensor) -> Tensor:
    """P[l] W_ih^T of every task: P (L-1, G, Np, D), weight_ih (S, G, 4D, D) with S = 1 (a shared cell) or
    L-1 -> (L-1, G, Np, 4D). A shared cell is one bmm over the tasks with the L-1 steps' prompts as rows:
    broadcasting its weight over the steps in a matmul would copy it L-1 times first."""
    steps, G, n_p, D = P.shape
    if weight_ih.shape[0] == steps:
        return torch.matmul(P, weight_ih.transpose(-1, -2))
    rows = P.transpose(0, 1).reshape(G, steps * n_p, D)
    return torch.bmm(rows, weight_ih[0].transpose(1, 2)).view(G, steps, n_p, -1).transpose(0, 1)


def _unsort(rows: Tensor, order: Tensor) -> Tensor:
    """Rows of the task-sorted batch back in the caller's order (row order[i] of the caller is row i)."""
    return torch.empty_like(rows).index_copy_(0, order, rows)


def _check_file(path, vit, reference: dict | None, fingerprint: list) -> dict:
    """A tuned file's config, checked before anything is built: tuned on `vit` (embed_dim/depth, and the
    weights' fingerprint when lspt-train recorded one; `fingerprint` caches vit's, computed once), and
    of the method and options of `reference` (the first file's config; None for the first file).
    Returns its config."""
    config, record = train_record(path, option="tuned file")
    for key, value in (("embed_dim", vit.embed_dim), ("depth", len(vit.blocks))):
        if key in config and config[key] != value:
            raise ValueError(f"{path} was tuned on another backbone: {key}={config[key]}, the given vit has "
                             f"{key}={value}")
    expected = record.get("backbone_sha256")
    if expected:
        if not fingerprint:
            fingerprint.append(backbone_fingerprint(vit))
        if fingerprint[0] is not None and fingerprint[0] != expected:
            raise ValueError(f"{path} was tuned on another backbone: its {TRAIN_RECORD!r} record has the weights' "
                             f"sha256 {expected}, the given vit's is {fingerprint[0]}")
    if reference is not None:
        if config["method"] != reference["method"]:
            raise ValueError(f"{path} holds {config['method']!r} parameters, the first task is "
                             f"{reference['method']!r}: one MultiTaskEncoder serves one method")
        diffs = [f"{k}={config.get(k)!r} (the first task has {reference.get(k)!r})"
                 for k in sorted(set(config) | set(reference))
                 if k not in _PER_TASK_OPTIONS and config.get(k) != reference.get(k)]
        if diffs:
            raise ValueError(f"{path} has other {config['method']!r} options than the first task: "
                             + "; ".join(diffs))
    return config if reference is None else reference
