"""LSPT, GaPT, VPT, the Adapter and the linear probe around any timm VisionTransformer: one block loop.

Every method runs the same loop over one token buffer `[prefix (k) | prompts (Np) | patches (N)]`
(built once, after the position embedding). What differs between methods is two small hooks:
`_run_block` (GaPT divides the attention logits by a temperature; the Adapter adds its bottleneck
after the MLP) and `_after_block` (what the prompt slot becomes before the next block), which write
the next prompts straight into the slot of the block's output. The backbone is frozen and kept in
eval mode, as the official VPT/GaPT code does. The maths, and every decision where the papers are
silent, is in docs/method.md.
"""
from __future__ import annotations

import copy
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .contract import check_fused_inputs
from .eager import gate_bias_rows
from .ops import fused_step, resolve_backend
from .precision import autocast_enabled
from .selfcheck import token_layout

__all__ = ["PromptEncoder", "LinearProbe", "VPTEncoder", "GaPTEncoder", "LSPTEncoder", "AdapterEncoder",
           "METHODS", "build_encoder", "HEAD_INITS", "POOLS", "TRAINING_ONLY_OPTIONS"]

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


def _check_vit(vit) -> None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise ImportError("lspt_kernels needs timm") from exc
    if not isinstance(vit, VisionTransformer):
        raise TypeError("expected a timm VisionTransformer (e.g. timm.create_model('vit_base_patch16_224')),"
                        f" got {type(vit).__module__}.{type(vit).__name__}")


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
    _check_vit(vit)
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


def _check_block_layout(vit, why: str) -> None:
    """GaPT and the Adapter re-run timm's Block forward with a change inside: they need its layout."""
    for i, block in enumerate(vit.blocks):
        attn = getattr(block, "attn", None)
        if not all(hasattr(block, a) for a in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")) \
                or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale", "proj")):
            raise TypeError(f"{why} need timm's Block/Attention layout; block {i} is "
                            f"{type(block).__name__} with attention {type(attn).__name__}")


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


class PromptEncoder(nn.Module):
    """A frozen timm ViT, a prompt slot of `num_prompts` tokens, a trainable linear head.

    Subclasses set the trainable parameters and override `_after_block` / `_run_block`.
    """

    method = "base"

    def __init__(self, vit: nn.Module, num_prompts: int, num_classes: int, prompt_dropout: float = 0.0,
                 head_init: str = "torch", pool: str = "model"):
        super().__init__()
        _check_vit(vit)
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

    def save_tuned(self, path) -> None:
        """Write the tuned parameters (not the backbone) to a safetensors file. `path`: str or
        os.PathLike, '~' expanded; its directory must exist."""
        from safetensors.torch import save_file

        from .checkpoints import as_path
        path = as_path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
        tensors = {n: t.contiguous().cpu() for n, t in self.tuned_state_dict().items()}
        save_file(tensors, str(path), metadata={"lspt_kernels": json.dumps(self.config())})

    def load_tuned(self, path) -> None:
        """Load parameters written by `save_tuned` into this encoder (same method and shapes)."""
        from .checkpoints import load_tuned_file
        load_tuned_file(self, path)

    # --- the block loop -----------------------------------------------------------------------------
    def _check_images(self, images) -> None:
        """A (B, C, H, W) float tensor on the model's device, of the ViT's size. Its float dtype may
        differ from the model's: `_embed` casts it (see `_images_in_model_dtype`)."""
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

    def _embed(self, images: Tensor) -> Tensor:
        vit = self.vit
        x = vit.patch_embed(_images_in_model_dtype(images, vit.patch_embed.proj.weight))
        x = vit._pos_embed(x)            # prefix tokens and position embedding (timm's own)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def _first_prompts(self) -> Tensor | None:
        """(Np, D) prompts for the slot before block 1; None for no prompts."""
        return None

    def _init_state(self, x: Tensor):
        return None

    def _run_block(self, l: int, block: nn.Module, x: Tensor) -> Tensor:
        return block(x)

    def _after_block(self, l: int, x_in: Tensor, x: Tensor, state) -> None:
        """Write the prompts for block l + 1 into x's prompt slot (in place). l is 0-based."""

    def _batch_prompts(self, P: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        """(Np, D) prompts -> (B, Np, D) for one batch. Dropout comes after the expansion, so every
        image gets its own mask, as in the official VPT/GaPT code; without dropout the result is a
        stride-0 view (no copy)."""
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

    def _checkpointed_block(self, l: int, block: nn.Module, x: Tensor, state):
        """Block l and the step after it as one checkpointed unit.

        Backward re-runs the unit from the same inputs, so it must be a function of them: the carried
        state goes in and out as tensors and every call works on its own (shallow) copy of the state,
        and the in-place writes land in the block's fresh output, never in an input. What the copy
        shares is read-only or only grows the same way on every run (LSPT's cast-weights cache). The
        RNG state is replayed, so prompt dropout inside the unit draws the same mask again."""
        from torch.utils.checkpoint import checkpoint

        def unit(x: Tensor, *carried: Tensor):
            own = self._with_carried(state, carried)
            x_in, x = x, self._run_block(l, block, x)
            if l < self.depth - 1:
                self._after_block(l, x_in, x, own)
            return (x, *self._carried(own))

        x, *carried = checkpoint(unit, x, *self._carried(state), use_reentrant=False,
                                 preserve_rng_state=True)
        return x, self._with_carried(state, tuple(carried))

    def prompt_slot(self, x: Tensor) -> Tensor:
        k = self.num_prefix_tokens
        return x[:, k:k + self.num_prompts]

    def forward_features(self, images: Tensor) -> Tensor:
        self._check_images(images)
        x = self._embed(images)                                             # (B, k + N, D)
        first = self._first_prompts()
        if first is not None:
            k = self.num_prefix_tokens
            first = self._batch_prompts(first, x.shape[0], x.dtype)
            x = torch.cat([x[:, :k], first, x[:, k:]], dim=1)             # the one token buffer
        state = self._init_state(x)
        checkpointed = self.depth if self.checkpoint_blocks is None else self.checkpoint_blocks
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            checkpointed = 0
        for l, block in enumerate(self.vit.blocks):
            if l < checkpointed:
                x, state = self._checkpointed_block(l, block, x, state)
                continue
            x_in, x = x, self._run_block(l, block, x)
            if l < self.depth - 1:
                self._after_block(l, x_in, x, state)
        return self._pool(x)

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

    def _first_prompts(self):
        return self.prompts[0] if self.deep else self.prompts

    def _after_block(self, l, x_in, x, state):
        if self.deep:
            self.prompt_slot(x).copy_(self._batch_prompts(self.prompts[l + 1], x.shape[0], x.dtype))


def _attention(attn: nn.Module, x: Tensor, temperature: Tensor) -> Tensor:
    """timm's Attention forward with the logits q.k^T.scale divided by `temperature`."""
    B, T, C = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    # SDPA takes a float scale; a learnable temperature divides q instead (same logits).
    out = F.scaled_dot_product_attention(q / temperature.to(q.dtype), k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(B, T, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    return attn.proj(out)


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
        _check_depth(vit, "GaPT", "its gates mix the prompts between consecutive blocks")
        super().__init__(vit, num_prompts, num_classes, prompt_dropout, head_init, pool)
        _check_block_layout(vit, "GaPT's temperatures")
        self._config["gate_init"] = gate_init
        self.prompts = self._init_prompts((num_prompts, self.embed_dim))
        self.gate_logits = nn.Parameter(torch.full((self.depth - 1,), -float(gate_init)))
        self.temperatures = nn.Parameter(torch.ones(self.depth))

    def project_temperatures(self) -> None:
        """Clamp the temperature parameter itself into TEMPERATURE_RANGE. Through `.data`, as the
        official code: no autograd record and no version bump, so a graph from an earlier forward that
        saved the temperatures can still run backward (two forwards, one backward); works under
        torch.compile(fullgraph=True)."""
        self.temperatures.data.clamp_(*self.TEMPERATURE_RANGE)

    def forward_features(self, images: Tensor) -> Tensor:
        self.project_temperatures()
        return super().forward_features(images)

    def _first_prompts(self):
        return self.prompts

    def _run_block(self, l, block, x):
        t = self.temperatures[l]
        x = x + block.drop_path1(block.ls1(_attention(block.attn, block.norm1(x), t)))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

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

    @property
    def fused(self) -> bool:
        """Whether the step runs as the fused `lspt_step` op (the default configuration)."""
        return self.cspc == "mean" and self.lpc == "lstm" and self.lstm_layers == 1

    def _first_prompts(self):
        return self.prompts[0]

    def _lpc_module(self, attr: str, l: int):
        m = getattr(self, attr)
        return m[0 if self.shared_lstm else l] if isinstance(m, nn.ModuleList) else m

    def _init_state(self, x):
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
        have the first one's signature). Inside a trace they run every time: they cost nothing there."""
        signature = None
        if not torch.compiler.is_compiling():
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
        _check_block_layout(vit, "Adapters")
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

    def _run_block(self, l, block, x):
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        return x + block.drop_path2(block.ls2(self.adapters[l](block.mlp(block.norm2(x)))))


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
_NO_PROMPTS = ("linear", "adapter")


def build_encoder(method: str, vit: nn.Module, **kwargs) -> PromptEncoder:
    """The encoder for a method name ("lspt", "gapt", "vpt-deep", "adapter", ...) around `vit`; kwargs
    go to it. A tuned file's `config()` minus "method" is accepted as kwargs: its record-only entries
    (embed_dim, depth, deep, adapter_dim) are checked against `vit` and the method, not passed on."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    _check_vit(vit)
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
    if method in _NO_PROMPTS:
        kwargs.pop("num_prompts", None)          # no prompts: the tools pass these to every method
        kwargs.pop("prompt_dropout", None)
    return METHODS[method](vit, **kwargs)
