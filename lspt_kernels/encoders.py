"""LSPT, GaPT, VPT, the Adapter and the linear probe around a timm VisionTransformer or Eva: one block loop.

Every method runs the same loop over one token buffer `[prefix (k) | prompts (Np) | patches (N)]`
(built once, after the position embedding). What differs between methods is two small hooks:
`_run_block` (GaPT divides the attention logits by a temperature; the Adapter adds its bottleneck
after the MLP) and `_after_block` (what the prompt slot becomes before the next block), which write
the next prompts straight into the slot of the block's output. What differs between the backbone
families (Eva's rotary embeddings, its blocks and attentions) is in `backbones`. The backbone is
frozen and kept in eval mode, as the official VPT/GaPT code does. The maths, and every decision where
the papers are silent, is in docs/method.md.
"""
from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .backbones import (
    block_ropes,
    check_attention,
    check_block_layout,
    check_vit,
    embed,
    is_eva,
    run_block,
    run_block_with,
)
from .checkpoints import as_path, is_mae_file, load_backbone_checkpoint, load_tuned_file, save_tuned_file
from .contract import check_fused_inputs
from .eager import gate_bias_rows
from .ops import fused_step, resolve_backend
from .precision import autocast_enabled
from .selfcheck import token_layout

__all__ = ["PromptEncoder", "LinearProbe", "VPTEncoder", "GaPTEncoder", "LSPTEncoder", "AdapterEncoder",
           "METHODS", "METHODS_WITHOUT_PROMPTS", "build_encoder", "from_timm", "check_vit", "HEAD_INITS", "POOLS",
           "TRAINING_ONLY_OPTIONS", "take_indices"]

# "torch": nn.Linear's own init. "official": GaPT's head (kaiming-normal fan_out weight, bias
# -log((1 - 0.01) / 0.01)), which LSPT's training setup follows.
HEAD_INITS = ("torch", "official")

# How the last block's tokens become the head's features (docs/method.md, "Features"):
# "model": the timm model's own (final norm, then its global_pool: CLS for 'token');
# "token": the first prefix token (CLS) after the final norm (MoCo v3, official GaPT vit_moco.py:164-166);
# "mae":   the final norm applied to the mean of every token after the prefix tokens, prompts included
#          (official GaPT vit_prompt/vit_mae.py:162-164).
POOLS = ("model", "token", "mae")

# config() entries that only shape initialisation or training, not the function a tuned file's
# parameters compute: load_tuned does not require them to match.
TRAINING_ONLY_OPTIONS = ("prompt_dropout", "head_init", "gate_init", "adapter_init")


def _check_layout(vit) -> None:
    """At least one block, and a pooling. global_pool='' makes forward_head return every token,
    (B, T, D): the head would give per-token "logits" without a word, so it is refused rather than a
    pooling guessed."""
    if len(vit.blocks) == 0:
        raise ValueError("the ViT has no blocks (depth=0): there is nothing to prompt or probe")
    if getattr(vit, "global_pool", None) == "" and getattr(vit, "attn_pool", None) is None:
        raise ValueError("the ViT has global_pool='' (no pooling: forward_head returns all (B, T, D) tokens); "
                         "build it with global_pool='token' (class token) or 'avg' (mean of the patch tokens), "
                         "e.g. timm.create_model(name, global_pool='avg'), or call vit.reset_classifier(0, 'avg')")


def _check_count(name: str, value, minimum: int) -> None:
    """An int >= minimum. bool is an int subclass, but True as a count is always a slip: refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}"
                         + (" (a bool, not a count)" if isinstance(value, bool) else ""))


def _check_depth(vit, method: str, why: str) -> None:
    """GaPT's gates and LSPT's LSTM act between blocks l and l + 1: with one block they would be
    trainable parameters that never run, so such a ViT is refused rather than silently degenerate."""
    check_vit(vit)
    _check_layout(vit)
    if len(vit.blocks) < 2:
        raise ValueError(f"{method} needs a ViT with at least 2 blocks ({why}), this one has "
                         f"{len(vit.blocks)}; use method 'vpt-deep' or 'vpt-shallow' for a 1-block ViT")


def _images_in_model_dtype(images: Tensor, weight: Tensor) -> Tensor:
    """Images of another float dtype than the model (fp64 from numpy, fp16/bf16 from a loader) are
    cast to the patch embedding's weight dtype, with no copy when they already match; timm's own
    forward would fail in the convolution instead. Under autocast, fp16/bf16/fp32 images are left to
    autocast (it casts them itself); fp64 ones are still cast, as autocast does not touch fp64."""
    if images.dtype == weight.dtype:
        return images
    if autocast_enabled(images.device.type) and images.dtype != torch.float64:
        return images
    return images.to(weight.dtype)


def _final_norm(vit) -> nn.Module:
    """The model's one final LayerNorm: `norm`, or `fc_norm` in timm's avg-pool layout (where `norm` is
    an Identity); an MAE file's pretrained `norm.*` weights are loaded into whichever it is."""
    if not isinstance(vit.norm, nn.Identity):
        return vit.norm
    return getattr(vit, "fc_norm", vit.norm)


def prompt_init_bound(vit) -> float:
    """VPT/GaPT's uniform init bound sqrt(6 / (3 p^2 + D)), p the patch size (pixels)."""
    patch = vit.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return math.sqrt(6.0 / float(3 * patch * patch + vit.embed_dim))


def take_indices(depth: int, indices) -> list[int]:
    """timm's `feature_take_indices` rule, with errors that name the argument: None -> every block; an
    int n -> the last n blocks; a list or tuple -> those 0-based blocks, negatives counting from the end.
    Returns the absolute indices in the order given."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if indices is None:
        return list(range(depth))
    if is_int(indices):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices} (the last n blocks) must be in [1, {depth}] for a {depth}-block ViT")
        return list(range(depth - indices, depth))
    if not isinstance(indices, (list, tuple)) or not indices or not all(is_int(i) for i in indices):
        raise ValueError(f"indices must be None, an int (the last n blocks) or a non-empty list of block "
                         f"indices, got {indices!r}")
    bad = [i for i in indices if not -depth <= i < depth]
    if bad:
        raise ValueError(f"indices {bad} are out of range for a {depth}-block ViT (0-based, -{depth} to {depth - 1})")
    return [i % depth for i in indices]


class PromptEncoder(nn.Module):
    """A frozen timm ViT, a prompt slot of `num_prompts` tokens, a trainable linear head.

    Subclasses set the trainable parameters and override `_after_block` / `_run_block`.
    """

    method = "base"

    def __init__(self, vit: nn.Module, num_prompts: int, num_classes: int, prompt_dropout: float = 0.0,
                 head_init: str = "torch", pool: str = "model"):
        super().__init__()
        check_vit(vit)
        _check_layout(vit)
        _check_count("num_classes", num_classes, 1)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if pool == "token" and getattr(vit, "cls_token", None) is None:
            raise ValueError("pool='token' needs a ViT with a class token; this one has none (use 'mae' or 'model')")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        self.vit = vit
        for p in vit.parameters():
            p.requires_grad_(False)
        vit.eval()
        self.num_prompts = num_prompts
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.depth = len(vit.blocks)
        self.embed_dim = vit.embed_dim
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        self.checkpoint_blocks: int | None = None        # set_grad_checkpointing(blocks=...); None: all
        self.head = nn.Linear(self.embed_dim, num_classes)
        if head_init == "official":
            nn.init.kaiming_normal_(self.head.weight, a=0, mode="fan_out")
            nn.init.constant_(self.head.bias, -math.log((1 - 0.01) / 0.01))
        self.pool = pool
        self._config = dict(num_prompts=num_prompts, num_classes=num_classes, prompt_dropout=prompt_dropout,
                            head_init=head_init, pool=pool, embed_dim=self.embed_dim, depth=self.depth)

    # --- the frozen backbone stays in eval mode (no dropout / drop-path inside it) ------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.vit.eval()
        return self

    # --- parameters ---------------------------------------------------------------------------------
    def _init_prompts(self, shape) -> nn.Parameter:
        v = prompt_init_bound(self.vit)
        return nn.Parameter(torch.empty(shape).uniform_(-v, v))

    def _follow_backbone(self) -> None:
        """The last step of every encoder's __init__: its own parameters and modules go to the backbone's
        device and dtype (a `.double()`, GPU or meta ViT). They are created in fp32 on the CPU first, so a
        seed gives the same initial values wherever the backbone is."""
        w = self.vit.patch_embed.proj.weight
        where = dict(device=w.device, dtype=w.dtype)
        for module in self.children():
            if module is not self.vit:
                module.to(**where)
        for name, p in list(self.named_parameters(recurse=False)):
            if (p.device, p.dtype) != (w.device, w.dtype):
                setattr(self, name, nn.Parameter(p.detach().to(**where), requires_grad=p.requires_grad))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see (the backbone's are frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def tuned_state_dict(self) -> dict[str, Tensor]:
        """Only the tuned parameters (prompts, LSTM/gates/temperatures, head), by public name."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def parameter_report(self) -> dict:
        """Trainable count and the paper tables' "Total Params": (backbone + trainable) / backbone,
        the backbone counted without its own classifier head."""
        backbone = sum(p.numel() for n, p in self.vit.named_parameters() if not n.startswith("head."))
        groups: dict[str, int] = {}
        for n, p in self.named_parameters():
            if p.requires_grad:
                groups[n.split(".")[0]] = groups.get(n.split(".")[0], 0) + p.numel()
        trainable = sum(groups.values())
        return dict(method=self.method, trainable=trainable, backbone=backbone, groups=groups,
                    total_params_ratio=(backbone + trainable) / backbone)

    def config(self) -> dict:
        return dict(method=self.method, **self._config)

    def save_tuned(self, path, metadata: dict | None = None) -> None:
        """Write the tuned parameters (not the backbone) to a safetensors file, with `config()` as its
        metadata. `metadata`: extra entries (name -> JSON-serialisable value) stored beside it, e.g.
        lspt-train's record of the backbone and data. `path`: str or os.PathLike, '~' expanded; its
        directory must exist."""
        save_tuned_file(self, path, metadata)

    def load_tuned(self, path) -> None:
        """Load parameters written by `save_tuned` into this encoder (same method and shapes)."""
        load_tuned_file(self, path, training_only=TRAINING_ONLY_OPTIONS)

    # --- the block loop -----------------------------------------------------------------------------
    def check_images(self, images) -> None:
        """Raise a clear error unless `images` is a (B, C, H, W) float tensor on the model's device, of
        the ViT's size. Its float dtype may differ from the model's: `embed` casts it (see
        `_images_in_model_dtype`)."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {got}")
        pe = self.vit.patch_embed
        in_chans = pe.proj.in_channels
        B, C, H, W = images.shape
        if C != in_chans:
            raise ValueError(f"images must have {in_chans} channels (B, {in_chans}, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        weight = pe.proj.weight
        if images.device != weight.device:
            raise ValueError(f"images are on {images.device} but the model is on {weight.device}")
        ph, pw = pe.patch_size
        if not getattr(pe, "strict_img_size", True) or getattr(self.vit, "dynamic_img_size", False):
            if not getattr(pe, "dynamic_img_pad", False) and (H % ph or W % pw):
                raise ValueError(f"image size ({H}, {W}) must be a multiple of the patch size {(ph, pw)}")
        elif pe.img_size is not None and (H, W) != tuple(pe.img_size):
            raise ValueError(f"images must be {tuple(pe.img_size)} pixels for this ViT (B, {in_chans}, "
                             f"{pe.img_size[0]}, {pe.img_size[1]}), got {tuple(images.shape)}; build the "
                             "model with img_size=... or dynamic_img_size=True for other sizes")

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, C, H, W) images -> the tokens entering block 1 without prompts, (B, k + N, D), and the rotary
        embedding of the patch tokens (None for a backbone without RoPE): the frozen backbone's patch
        embedding, prefix tokens, position embedding(s) and pre-norm, timm's own (`backbones.embed`).
        `backbones.block_ropes` turns the rope into each block's, for a buffer with or without prompts."""
        return embed(self.vit, _images_in_model_dtype(images, self.vit.patch_embed.proj.weight))

    def _first_prompts(self, rows=None) -> Tensor | None:
        """(Np, D) prompts for the slot before block 1, or (B, Np, D) already one per image; None for no
        prompts. `rows`: what `_run_blocks` was given (a multi-task batch's rows; None otherwise)."""
        return None

    def _init_state(self, x: Tensor, rows=None):
        """What the hooks carry through one forward, from the token buffer x and `_run_blocks`'s `rows`."""
        return None

    def _run_block(self, l: int, block: nn.Module, x: Tensor, rope: Tensor | None, state) -> Tensor:
        """Block l on the buffer x; `rope`: the block's rotary embedding of the prompts and patches (None
        without RoPE); `state`: `_init_state`'s."""
        return run_block(block, x, rope)

    def _after_block(self, l: int, x_in: Tensor, x: Tensor, state) -> None:
        """Write the prompts for block l + 1 into x's prompt slot (in place). l is 0-based."""

    def _batch_prompts(self, P: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        """(Np, D) prompts (or (B, Np, D), one per image) -> (B, Np, D) for one batch. Dropout comes after
        the expansion, so every image gets its own mask, as in the official VPT/GaPT code; without dropout
        the result is a stride-0 view (no copy)."""
        P = P.to(dtype).expand(batch, -1, -1)
        return self.prompt_dropout(P) if self.training and self.prompt_dropout.p > 0 else P

    # --- gradient checkpointing (timm's flag on the backbone is the one switch) -------------------------
    @property
    def grad_checkpointing(self) -> bool:
        return bool(getattr(self.vit, "grad_checkpointing", False))

    def set_grad_checkpointing(self, enable: bool = True, *, blocks: int | None = None) -> "PromptEncoder":
        """Recompute each block together with the step after it in backward instead of keeping their
        activations (timm's `vit.set_grad_checkpointing`, which this also honours, sets the same flag).

        blocks: checkpoint only the first `blocks` blocks (default: all). With a frozen backbone,
        backward costs about one forward, so checkpointing every block costs about 1.5x the time of a
        plain step; a fraction f of the blocks costs about 1 + f/2 for most of the memory saving."""
        if blocks is not None and (not isinstance(blocks, int) or isinstance(blocks, bool)
                                   or not 0 <= blocks <= self.depth):
            raise ValueError(f"blocks must be an int in [0, {self.depth}] (the depth) or None for all, "
                             f"got {blocks!r}")
        self.vit.set_grad_checkpointing(enable)
        self.checkpoint_blocks = blocks
        return self

    def _carried(self, state) -> tuple[Tensor, ...]:
        """The tensors of `state` that `_after_block` replaces from one block to the next."""
        return ()

    def _with_carried(self, state, tensors: tuple[Tensor, ...]):
        """A copy of `state` holding `tensors` as its carried tensors; `state` itself is unchanged."""
        return state

    def _checkpointed_block(self, l: int, block: nn.Module, x: Tensor, rope: Tensor | None, state):
        """Block l and the step after it as one checkpointed unit.

        Backward re-runs the unit from the same inputs, so it must be a function of them: the carried
        state goes in and out as tensors and every call works on its own (shallow) copy of the state,
        and the in-place writes land in the block's fresh output, never in an input. What the copy
        shares is read-only or only grows the same way on every run (LSPT's cast-weights cache). The
        RNG state is replayed, so prompt dropout inside the unit draws the same mask again."""
        from torch.utils.checkpoint import checkpoint

        def unit(x: Tensor, *carried: Tensor):
            own = self._with_carried(state, carried)
            x_in, x = x, self._run_block(l, block, x, rope, own)
            if l < self.depth - 1:
                self._after_block(l, x_in, x, own)
            return (x, *self._carried(own))

        x, *carried = checkpoint(unit, x, *self._carried(state), use_reentrant=False,
                                 preserve_rng_state=True)
        return x, self._with_carried(state, tuple(carried))

    def prompt_slot(self, x: Tensor) -> Tensor:
        k = self.num_prefix_tokens
        return x[:, k:k + self.num_prompts]

    def _run_blocks(self, images: Tensor, take: frozenset[int] = frozenset(),
                    stop: int | None = None, rows=None) -> tuple[Tensor, list[Tensor]]:
        """The one block loop (forward_features and forward_intermediates both run it): the token
        buffer, then blocks 0..stop (all when None), each followed by the method's step unless it is
        the model's last block. Returns the last block's tokens (B, T, D) and, in block order, the
        patch tokens (B, N, D) after every block l in `take` (read once the step has written the
        prompt slot: the patches are the block's own, and no later in-place write touches their base).
        `rows` goes to `_first_prompts` and `_init_state` as it is: MultiTaskEncoder's row-to-task map (None
        for a single-task encoder)."""
        self.check_images(images)
        x, rope = self.embed(images)                                        # (B, k + N, D)
        ropes = block_ropes(self.vit, rope, self.num_prompts)              # prompts: identity rotation
        first = self._first_prompts(rows)
        if first is not None:
            k = self.num_prefix_tokens
            first = self._batch_prompts(first, x.shape[0], x.dtype)
            x = torch.cat([x[:, :k], first, x[:, k:]], dim=1)             # the one token buffer
        state = self._init_state(x, rows)
        checkpointed = self.depth if self.checkpoint_blocks is None else self.checkpoint_blocks
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            checkpointed = 0
        start, taken = self.num_prefix_tokens + self.num_prompts, []
        blocks = self.vit.blocks if stop is None else self.vit.blocks[:stop + 1]
        for l, block in enumerate(blocks):
            if l < checkpointed:
                x, state = self._checkpointed_block(l, block, x, ropes[l], state)
            else:
                x_in, x = x, self._run_block(l, block, x, ropes[l], state)
                if l < self.depth - 1:
                    self._after_block(l, x_in, x, state)
            if l in take:
                taken.append(x[:, start:])
        return x, taken

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, D) features: the pooling (`pool`) of the last block's tokens."""
        return self._pool(self._run_blocks(images)[0])

    def forward_intermediates(self, images: Tensor, indices: int | list[int] | tuple[int, ...] | None = None, *,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Dense features of the blocks `indices`, with the meaning of timm's
        `VisionTransformer.forward_intermediates`: an int n takes the last n blocks, a list takes those
        0-based blocks (negatives count from the end), None takes all; they come back in block order.

        Each intermediate holds the PATCH tokens only (the prefix and prompt tokens are dropped), as
        (B, D, H/p, W/p) for output_fmt "NCHW" or (B, N, D) for "NLC"; norm=True applies the ViT's
        final `norm` to them, as timm does. The blocks run in the same loop as `forward_features`
        (every method's step after every block but the last, gradient checkpointing included);
        stop_early=True runs no block after the last one taken. Returns the list when
        intermediates_only, else (features, list) with features what `forward_features` returns ((B, D),
        the pooling of the last block run)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = take_indices(self.depth, indices)
        last = max(take)
        x, taken = self._run_blocks(images, frozenset(take), last if stop_early else None)
        if norm:
            taken = [self.vit.norm(t) for t in taken]
        if output_fmt == "NCHW":
            B, H, W = images.shape[0], *self.vit.patch_embed.dynamic_feat_size(images.shape[-2:])
            taken = [t.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for t in taken]
        return taken if intermediates_only else (self._pool(x), taken)

    def _pool(self, x: Tensor) -> Tensor:
        """(B, T, D) last block output -> (B, D) features, as `self.pool` says (POOLS)."""
        if self.pool == "mae":
            # Official order: mean first, then the pretrained final norm.
            return _final_norm(self.vit)(x[:, self.num_prefix_tokens:].mean(1))
        if self.pool == "token":
            return _final_norm(self.vit)(x[:, 0])
        return self.vit.forward_head(self.vit.norm(x), pre_logits=True)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images))


class LinearProbe(PromptEncoder):
    """Frozen backbone, trainable head only."""

    method = "linear"

    def __init__(self, vit: nn.Module, num_classes: int, head_init: str = "torch", pool: str = "model"):
        super().__init__(vit, 0, num_classes, head_init=head_init, pool=pool)
        self._follow_backbone()


def _check_num_prompts(num_prompts) -> None:
    _check_count("num_prompts", num_prompts, 1)


class VPTEncoder(PromptEncoder):
    """VPT (Jia et al. 2022). deep=True: P (L, Np, D), block l's prompt slot is P[l-1];
    deep=False (shallow): P (Np, D) enters once and the prompt outputs flow on."""

    def __init__(self, vit: nn.Module, num_prompts: int = 10, num_classes: int = 1000, deep: bool = True,
                 prompt_dropout: float = 0.0, head_init: str = "torch", pool: str = "model"):
        _check_num_prompts(num_prompts)
        super().__init__(vit, num_prompts, num_classes, prompt_dropout, head_init, pool)
        self.deep = deep
        self.method = "vpt-deep" if deep else "vpt-shallow"
        self._config["deep"] = deep
        D = self.embed_dim
        self.prompts = self._init_prompts((self.depth, num_prompts, D) if deep else (num_prompts, D))
        self._follow_backbone()

    def _first_prompts(self, rows=None):
        return self.prompts[0] if self.deep else self.prompts

    def _after_block(self, l, x_in, x, state):
        if self.deep:
            self.prompt_slot(x).copy_(self._batch_prompts(self.prompts[l + 1], x.shape[0], x.dtype))


class GaPTEncoder(PromptEncoder):
    """GaPT (Yoo et al. 2023, ryongithub/GatedPromptTuning): VPT-shallow prompts; after block l < L the
    prompt slot becomes g*out + (1-g)*in with g = sigmoid(gate_logits[l]); block l's attention logits
    are divided by temperatures[l].

    The temperatures are projected onto [0.01, 10] in place before every forward, as the official
    `reinit_temp` (vit_prompt/vit_moco.py:108-110, called at :136-137): the graph uses the parameter
    itself, so its gradient is never cut at a bound and a temperature that left the box can come back.
    """

    method = "gapt"
    TEMPERATURE_RANGE = (0.01, 10.0)     # official TEMP_MIN / TEMP_MAX (src/configs/config.py:84-85)

    def __init__(self, vit: nn.Module, num_prompts: int = 10, num_classes: int = 1000, gate_init: float = 5.0,
                 prompt_dropout: float = 0.0, head_init: str = "torch", pool: str = "model"):
        _check_num_prompts(num_prompts)
        if isinstance(gate_init, bool) or not isinstance(gate_init, numbers.Real) or not math.isfinite(gate_init):
            raise ValueError(f"gate_init must be a finite number (the initial gate logit is -gate_init), got "
                             f"{gate_init!r}")
        _check_depth(vit, "GaPT", "its gates mix the prompts between consecutive blocks")
        super().__init__(vit, num_prompts, num_classes, prompt_dropout, head_init, pool)
        check_block_layout(vit, "GaPT (its temperatures)")
        check_attention(vit, "GaPT (its temperatures)")
        self._config["gate_init"] = gate_init
        self.prompts = self._init_prompts((num_prompts, self.embed_dim))
        self.gate_logits = nn.Parameter(torch.full((self.depth - 1,), -float(gate_init)))
        self.temperatures = nn.Parameter(torch.ones(self.depth))
        self._follow_backbone()

    def project_temperatures(self) -> None:
        """Clamp the temperature parameter itself into TEMPERATURE_RANGE. Through `.data`, as the
        official code: no autograd record and no version bump, so a graph from an earlier forward that
        saved the temperatures can still run backward (two forwards, one backward); works under
        torch.compile(fullgraph=True)."""
        self.temperatures.data.clamp_(*self.TEMPERATURE_RANGE)

    def _run_blocks(self, images, take=frozenset(), stop=None):
        self.project_temperatures()
        return super()._run_blocks(images, take, stop)

    def _first_prompts(self, rows=None):
        return self.prompts

    def _run_block(self, l, block, x, rope, state):
        return run_block_with(block, x, rope, temperature=self.temperatures[l])

    def _after_block(self, l, x_in, x, state):
        g = torch.sigmoid(self.gate_logits[l]).to(x.dtype)
        slot, slot_in = self.prompt_slot(x), self.prompt_slot(x_in)
        # in + g * (out - in): autograd saves the difference, not a view of the slot written below.
        slot.copy_(slot_in + g * (slot - slot_in))


def kmeans_centroids(patches: Tensor, num_clusters: int, steps: int) -> Tensor:
    """Batched Lloyd's k-means over each image's patch tokens (B, N, D) -> (B, Np, D).

    Initialised from the patches at indices floor(j*N/Np); assignments carry no gradient, the
    centroids (means of their members) do; an empty cluster keeps its centroid."""
    B, N, D = patches.shape
    idx = (torch.arange(num_clusters, device=patches.device) * N) // num_clusters
    centroids = patches[:, idx]
    for _ in range(steps):
        with torch.no_grad():
            dist = (patches.unsqueeze(2) - centroids.unsqueeze(1)).pow(2).sum(-1)    # (B, N, Np)
            onehot = F.one_hot(dist.argmin(-1), num_clusters).to(patches.dtype)     # (B, N, Np)
            counts = onehot.sum(1).unsqueeze(-1)                                      # (B, Np, 1)
        sums = onehot.transpose(1, 2) @ patches                                       # (B, Np, D)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


class LSPTEncoder(PromptEncoder):
    """LSPT (Mo et al. 2024): deep prompts P (L, Np, D), and after every block l < L

        Xhat_SP = block prompt outputs + mean of the patch tokens          (CSPC)
        X_P, C  = LSTMCell(input=P[l], hidden=Xhat_SP, cell=C)             (LPC, shared over blocks)

    written into the prompt slot for block l + 1. The default configuration (with shared_lstm either
    way, with or without prompt dropout) runs the fused step op (`backend` picks its kernels: "auto",
    "eager", "cpu", "triton", "cuda"), with the batch-independent P[l] W_ih^T + biases of every
    step computed by one GEMM before the block loop; the other ablation options (docs/method.md) run
    in PyTorch:
    cspc "mean" | "kmeans" | "none"; lpc "lstm" | "gru" | "transformer" | "none"; lstm_layers 1 | 2;
    shared_lstm True | False (one module per block l < L).
    """

    method = "lspt"

    def __init__(self, vit: nn.Module, num_prompts: int = 10, num_classes: int = 1000, *, cspc: str = "mean",
                 lpc: str = "lstm", lstm_layers: int = 1, shared_lstm: bool = True, kmeans_steps: int = 3,
                 backend: str = "auto", prompt_dropout: float = 0.0, head_init: str = "torch",
                 pool: str = "model"):
        _check_num_prompts(num_prompts)
        _check_count("kmeans_steps", kmeans_steps, 0)
        _check_count("lstm_layers", lstm_layers, 1)
        _check_depth(vit, "LSPT", "its LSTM carries the prompts from block l to block l + 1")
        for name, value, allowed in (("cspc", cspc, ("mean", "kmeans", "none")),
                                     ("lpc", lpc, ("lstm", "gru", "transformer", "none")),
                                     ("lstm_layers", lstm_layers, (1, 2)),
                                     ("shared_lstm", shared_lstm, (True, False))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if lstm_layers != 1 and lpc != "lstm":
            raise ValueError(f"lstm_layers={lstm_layers} needs lpc='lstm', got lpc={lpc!r}")
        backends.canonical(backend)          # a ValueError naming the choices
        super().__init__(vit, num_prompts, num_classes, prompt_dropout, head_init, pool)
        self.cspc, self.lpc, self.lstm_layers, self.shared_lstm = cspc, lpc, lstm_layers, shared_lstm
        self.kmeans_steps, self.backend = kmeans_steps, backend
        self._checked_signature = None          # the last input signature the fused checks passed
        self._config.update(cspc=cspc, lpc=lpc, lstm_layers=lstm_layers, shared_lstm=shared_lstm,
                            kmeans_steps=kmeans_steps)
        D, L = self.embed_dim, self.depth
        self.prompts = self._init_prompts((L, num_prompts, D))
        # Module layout (kept equal to python/lspt_reference for one-to-one checkpoints): the default
        # is one nn.LSTMCell `lstm`; otherwise ModuleList[block or 0][layer] for the LSTM, and one
        # module or a ModuleList per block for the GRU / transformer.
        if lpc == "lstm":
            if shared_lstm and lstm_layers == 1:
                self.lstm = nn.LSTMCell(D, D)
            else:
                self.lstm = nn.ModuleList(nn.ModuleList(nn.LSTMCell(D, D) for _ in range(lstm_layers))
                                          for _ in range(1 if shared_lstm else L - 1))
        elif lpc == "gru":
            self.gru = nn.GRUCell(D, D) if shared_lstm else nn.ModuleList(nn.GRUCell(D, D) for _ in range(L - 1))
        elif lpc == "transformer":
            # Same parameter budget as the LSTM (8 D^2): attention 4 D^2 + a 2 D-wide MLP 4 D^2.
            make = lambda: nn.TransformerEncoderLayer(  # noqa: E731
                D, vit.blocks[0].attn.num_heads, dim_feedforward=2 * D, dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True)
            self.transformer = make() if shared_lstm else nn.ModuleList(make() for _ in range(L - 1))
        self._follow_backbone()

    @property
    def fused(self) -> bool:
        """Whether the step runs as the fused `lspt_step` op (the default configuration)."""
        return self.cspc == "mean" and self.lpc == "lstm" and self.lstm_layers == 1

    def _run_blocks(self, images, take=frozenset(), stop=None):
        if torch.jit.is_tracing() and self.fused and backends.canonical(self.backend) != "eager":
            # What the op saves for backward follows the grad mode, so traces taken with and without grad
            # differ and torch.jit.trace's check fails with a message that does not say why.
            raise RuntimeError("torch.jit.trace does not support LSPT's fused step: use torch.export or "
                               "torch.compile (both supported), or build the encoder with backend='eager' to trace it")
        return super()._run_blocks(images, take, stop)

    def _first_prompts(self, rows=None):
        return self.prompts[0]

    def _lpc_module(self, attr: str, l: int):
        m = getattr(self, attr)
        return m[0 if self.shared_lstm else l] if isinstance(m, nn.ModuleList) else m

    def _init_state(self, x, rows=None):
        B, D, n = x.shape[0], self.embed_dim, self.num_prompts
        autocast = autocast_enabled(x.device.type)
        # The cell state is carried in fp32 under autocast (it accumulates over L - 1 steps).
        dtype = torch.float32 if autocast else x.dtype
        cells = [torch.zeros(B, n, D, dtype=dtype, device=x.device) for _ in range(self.lstm_layers)]
        gemm_dtype = torch.get_autocast_dtype(x.device.type) if autocast else None
        state = dict(cells=cells, gemm_dtype=gemm_dtype, weights={})
        if self.fused:
            self._init_fused(x, state, autocast)
        return state

    def _fused_cell(self, l: int) -> nn.LSTMCell:
        cell = self._lpc_module("lstm", l)
        return cell[0] if isinstance(cell, nn.ModuleList) else cell

    def _init_fused(self, x: Tensor, state: dict, autocast: bool) -> None:
        """Once per forward, before the block loop: the backend, the input checks (once per input
        signature), and the batch-independent half of every step's gates, P[l] W_ih^T + b_ih + b_hh
        for l = 1..L-1 (one GEMM for a shared cell). Per-image prompt dropout makes those rows
        (B, Np, 4D) per step; its masks are drawn one step at a time, in the order the PyTorch path
        draws them."""
        B, steps = x.shape[0], range(self.depth - 1)
        dropping = self.training and self.prompt_dropout.p > 0
        cells = [self._fused_cell(0)] if self.shared_lstm else [self._fused_cell(l) for l in steps]
        weights = [self._step_weights(c, state) for c in cells]          # (w_ih, w_hh, b_ih, b_hh) in W
        w = weights[0][1].dtype
        cell = state["cells"][0]
        backend = resolve_backend(self.backend, x.device, x.dtype, cell.dtype, w, self.embed_dim,
                                  self.num_prefix_tokens, dropping, token_layout(x))
        if dropping:
            P = torch.stack([self._batch_prompts(self.prompts[l + 1], B, x.dtype) for l in steps]).to(w)
        else:
            P = self.prompts[1:].to(w)                                     # (L-1, [B,] Np, D)
        if self.shared_lstm:
            w_ih, w_hh, b_ih, b_hh = weights[0]
            gate_bias = gate_bias_rows(P, w_ih, b_ih, b_hh).unbind(0)      # L-1 x ([B,] Np, 4D)
            w_hhs = (w_hh,) * len(steps)
        else:
            gate_bias = [gate_bias_rows(P[l], w_ih, b_ih, b_hh) for l, (w_ih, _, b_ih, b_hh) in enumerate(weights)]
            w_hhs = [wt[1] for wt in weights]
        self._check_fused_once(x, cell, gate_bias[0], w_hhs[0], autocast)
        state.update(backend=backend, gate_bias=gate_bias, w_hh=w_hhs, save_gates=torch.is_grad_enabled())

    def _check_fused_once(self, x: Tensor, cell: Tensor, gate_bias: Tensor, w_hh: Tensor, autocast: bool) -> None:
        """The op's input checks, run again only when what they look at changes (every block's tokens
        have the first one's signature). Inside a trace they run every time: they cost nothing under
        torch.compile, and torch.jit.trace must record the same graph on every call."""
        signature = None
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            signature = (x.shape, x.stride(), x.dtype, x.device, cell.dtype, gate_bias.shape, gate_bias.dtype,
                         gate_bias.device, w_hh.shape, w_hh.dtype, w_hh.device, w_hh.is_contiguous(), autocast)
            if signature == self._checked_signature:
                return
        check_fused_inputs(x, cell, gate_bias, w_hh, self.num_prefix_tokens, autocast=autocast)
        if signature is not None:
            self._checked_signature = signature

    def _carried(self, state):
        return tuple(state["cells"])

    def _with_carried(self, state, tensors):
        return dict(state, cells=list(tensors))

    def _step_weights(self, cell: nn.LSTMCell, state) -> tuple[Tensor, ...]:
        """The cell's tensors in the GEMM dtype, cast once per forward (not once per block) under
        autocast, so backward keeps one low-precision copy of a shared cell, not L - 1."""
        tensors = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        if state["gemm_dtype"] is None:
            return tensors
        key = id(cell)
        if key not in state["weights"]:
            state["weights"][key] = tuple(t.to(state["gemm_dtype"]) for t in tensors)
        return state["weights"][key]

    def _after_block(self, l, x_in, x, state):
        cells = state["cells"]
        slot = self.prompt_slot(x)
        k, B, n, D = self.num_prefix_tokens, x.shape[0], self.num_prompts, self.embed_dim
        if self.fused:   # validated and resolved once per forward (_init_fused)
            hidden, cells[0] = fused_step(x, cells[0], state["gate_bias"][l], state["w_hh"][l], k,
                                          state["backend"], state["save_gates"])
            slot.copy_(hidden)
            return
        patches = x[:, k + n:]
        if self.cspc == "mean":
            spatial = patches.mean(1, keepdim=True)
        elif self.cspc == "kmeans":
            spatial = kmeans_centroids(patches, n, self.kmeans_steps)
        else:
            spatial = None
        # Xhat_SP; a copy when it is the slot itself, which is overwritten below.
        x_sp = slot + spatial if spatial is not None else slot.clone()
        P_b = self._batch_prompts(self.prompts[l + 1], B, x.dtype)         # (B, Np, D)
        if self.lpc == "lstm":
            layers = self._lpc_module("lstm", l)
            layers = [layers] if isinstance(layers, nn.LSTMCell) else layers     # stacked layers
            inp = P_b.reshape(B * n, D)
            for j, layer in enumerate(layers):
                h, c = layer(inp, (x_sp.reshape(B * n, D), cells[j].reshape(B * n, D)))
                cells[j] = c.view(B, n, D)
                inp = h
            new = h.view(B, n, D)
        elif self.lpc == "gru":
            new = self._lpc_module("gru", l)(P_b.reshape(B * n, D), x_sp.reshape(B * n, D)).view(B, n, D)
        elif self.lpc == "transformer":
            new = self._lpc_module("transformer", l)(torch.cat([x_sp, P_b], dim=1))[:, :n]
        else:
            new = P_b + spatial if spatial is not None else P_b
        slot.copy_(new)


ADAPTER_INITS = ("official", "zero-up")


class Adapter(nn.Module):
    """Pfeiffer's bottleneck: x + up(act(down(x))), applied to a block's MLP output."""

    def __init__(self, dim: int, hidden: int, act: nn.Module, init: str):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = act
        self.up = nn.Linear(hidden, dim)
        # Both inits start as the identity (the up-projection is zero).
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if init == "official":
            # KMnP/vpt src/models/vit_adapter/adapter_block.py:52-56 zeroes the down-projection too. Then
            # act(down(x)) = act(0) = 0 for GELU, so up.weight and down get a zero gradient for ever and only
            # up.bias learns (docs/method.md, "Adapter"). Kept as the default: it is what the paper's
            # Adapter numbers were produced with.
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.act(self.down(x)))


class AdapterEncoder(PromptEncoder):
    """The Adapter baseline (Pfeiffer style) as the official VPT code (KMnP/vpt
    src/models/vit_adapter/adapter_block.py:60-84): in every block, after the MLP and before the
    residual add, mlp_out + up(act(down(mlp_out))), hidden width D // reduction_factor (default 8,
    src/configs/config.py:80), act the block's own MLP activation (GELU). No prompts.

    adapter_init: "official" (all four tensors zero: only the up-projection's bias ever trains) |
    "zero-up" (nn.Linear's init for the down-projection, zero up-projection: starts as the identity and
    every adapter weight trains).
    """

    method = "adapter"

    def __init__(self, vit: nn.Module, num_classes: int = 1000, reduction_factor: int = 8,
                 adapter_init: str = "official", head_init: str = "torch", pool: str = "model"):
        super().__init__(vit, 0, num_classes, head_init=head_init, pool=pool)
        check_block_layout(vit, "The Adapter")
        if not isinstance(reduction_factor, int) or isinstance(reduction_factor, bool) or \
                not 1 <= reduction_factor <= self.embed_dim:
            raise ValueError(f"reduction_factor must be an int in [1, embed_dim={self.embed_dim}], "
                             f"got {reduction_factor!r}")
        if adapter_init not in ADAPTER_INITS:
            raise ValueError(f"adapter_init must be one of {ADAPTER_INITS}, got {adapter_init!r}")
        self._config.update(reduction_factor=reduction_factor, adapter_init=adapter_init,
                            adapter_dim=self.embed_dim // reduction_factor)
        hidden = self.embed_dim // reduction_factor

        def act(block):
            a = getattr(block.mlp, "act", None)
            return copy.deepcopy(a) if isinstance(a, nn.Module) else nn.GELU()

        self.adapters = nn.ModuleList(Adapter(self.embed_dim, hidden, act(b), adapter_init) for b in vit.blocks)
        self._follow_backbone()

    def _run_block(self, l, block, x, rope, state):
        return run_block_with(block, x, rope, adapter=self.adapters[l])


# The one table from a method name to its encoder: from_timm, lspt-bench, lspt-train and lspt-eval use it.
METHODS = {
    "linear": LinearProbe,
    "vpt-shallow": lambda vit, **kw: VPTEncoder(vit, deep=False, **kw),
    "vpt-deep": lambda vit, **kw: VPTEncoder(vit, deep=True, **kw),
    "gapt": GaPTEncoder,
    "lspt": LSPTEncoder,
    "adapter": AdapterEncoder,
}

# Methods without prompts: build_encoder drops the prompt options the tools pass to every method.
METHODS_WITHOUT_PROMPTS = ("linear", "adapter")


def build_encoder(method: str, vit: nn.Module, **kwargs) -> PromptEncoder:
    """The encoder for a method name ("lspt", "gapt", "vpt-deep", "adapter", ...) around `vit`; kwargs
    go to it. A tuned file's `config()` minus "method" is accepted as kwargs: its record-only entries
    (embed_dim, depth, deep, adapter_dim) are checked against `vit` and the method, not passed on."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    check_vit(vit)
    kwargs = dict(kwargs)
    expected = dict(embed_dim=vit.embed_dim, depth=len(vit.blocks))
    if method in ("vpt-deep", "vpt-shallow"):
        expected["deep"] = method == "vpt-deep"
    factor = kwargs.get("reduction_factor", 8)
    if method == "adapter" and isinstance(factor, int) and factor > 0:
        expected["adapter_dim"] = vit.embed_dim // factor
    owner = lambda key: "the vit" if key in ("embed_dim", "depth") else repr(method)  # noqa: E731
    problems = [f"{key}={kwargs[key]!r} but {owner(key)} has {key}={value!r}"
                for key, value in expected.items() if key in kwargs and kwargs[key] != value]
    if problems:
        raise ValueError(f"cannot build {method!r} around this {type(vit).__name__}: " + "; ".join(problems))
    for key in expected:
        kwargs.pop(key, None)
    if method in METHODS_WITHOUT_PROMPTS:
        kwargs.pop("num_prompts", None)          # no prompts: the tools pass these to every method
        kwargs.pop("prompt_dropout", None)
    return METHODS[method](vit, **kwargs)


def from_timm(name_or_model, checkpoint=None, method: str = "lspt", pool: str | None = None, **kwargs):
    """Build an encoder around a timm VisionTransformer or Eva given by name (random init, nothing
    downloaded) or module, with backbone weights from a local file (read by
    `checkpoints.load_backbone_checkpoint`): for a VisionTransformer an MAE / MoCo v3 / plain timm
    state dict; for an Eva a file of any release timm converts with its own checkpoint filter
    (Meta's DINOv3, BAAI's EVA-02, Perception Encoder, timm's own).

    method: a name of METHODS ("lspt", "gapt", "vpt-deep", "vpt-shallow", "adapter", "linear"); kwargs
    go to the encoder (num_prompts, num_classes, ...) except `img_size` / `dynamic_img_size`, which go
    to timm.
    pool: the features the head sees (POOLS). None: "mae" for an MAE file (the official MAE protocol:
    the pretrained final norm of the mean of all tokens after CLS), else "model" (the timm model's own
    pooling; CLS after the final norm for a 'token' model, as MoCo v3).
    """
    import timm

    if checkpoint is not None:
        checkpoint = as_path(checkpoint, "checkpoint")
    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS} or None (chosen from the checkpoint), got {pool!r}")
    if isinstance(name_or_model, str):
        timm_kwargs = {k: kwargs.pop(k) for k in ("img_size", "dynamic_img_size") if k in kwargs}
        try:
            vit = timm.create_model(name_or_model, pretrained=False, num_classes=0, **timm_kwargs)
        except RuntimeError as exc:
            raise ValueError(f"unknown timm model {name_or_model!r}: {exc}") from exc
    else:
        vit = name_or_model
    mae = False
    if checkpoint is not None:
        check_vit(vit)
        load_backbone_checkpoint(vit, checkpoint)
        mae = not is_eva(vit) and is_mae_file(checkpoint)      # MAE's layout is a ViT release's
    if pool is None:
        pool = "mae" if mae else "model"
    return build_encoder(method, vit, pool=pool, **kwargs)
