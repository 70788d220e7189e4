"""The pure-PyTorch reference: LSPT, GaPT, VPT, the Adapter and the linear probe, written plainly.

This package is the oracle of every parity test. It imports nothing from `lspt_kernels` and
favours reading over speed: the token sequence is rebuilt with torch.cat before every block, the
LSTM is `torch.nn.LSTMCell` called as the paper's algorithm A.1 does, GaPT's attention is written
out with an explicit softmax. Parameter names match `lspt_kernels`' encoders one to one, so
`reference.load_state_dict(encoder.tuned_state_dict())` gives both the same weights.

Official behaviours restated here: prompt dropout after the batch expansion (one mask per image,
GaPT vit_prompt/vit_moco.py:72-77); GaPT's temperatures projected onto [0.01, 10] in place before
the forward (vit_prompt/vit_moco.py:108-110, 136-137); MAE pooling = the final norm of the mean of
the tokens after CLS (vit_prompt/vit_mae.py:162-164); the Pfeiffer adapter after each MLP
(KMnP/vpt src/models/vit_adapter/adapter_block.py:60-84).

The maths is the repository's docs/method.md; section names below refer to it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ReferenceLSPT", "ReferenceGaPT", "ReferenceVPT", "ReferenceLinearProbe", "ReferenceAdapter",
           "kmeans_centroids"]


def _embed(vit, images):
    """Patch tokens with the prefix tokens and position embedding, as timm's forward_features."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def _features(vit, x, pool="model"):
    """The head's input from the last block's output.
    "model": the timm model's own pooling (final norm, then CLS for 'token');
    "token": CLS after the final norm (MoCo v3);
    "mae":   the pretrained final norm of the MEAN of all tokens after the prefix tokens (prompts too)."""
    norm = vit.norm if not isinstance(vit.norm, nn.Identity) else vit.fc_norm
    if pool == "mae":
        return norm(x[:, vit.num_prefix_tokens:].mean(dim=1))
    if pool == "token":
        return norm(x)[:, 0]
    return vit.forward_head(vit.norm(x), pre_logits=True)


class _Reference(nn.Module):
    def __init__(self, vit, num_prompts, num_classes, prompt_dropout=0.0, pool="model"):
        super().__init__()
        self.vit = vit
        self.num_prompts = num_prompts
        self.k = vit.num_prefix_tokens
        self.depth = len(vit.blocks)
        self.dim = vit.embed_dim
        self.head = nn.Linear(self.dim, num_classes)
        self.p_drop = prompt_dropout
        self.pool = pool

    def train(self, mode=True):
        """Train mode reaches the prompt dropout only; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.vit.eval()
        return self

    def batch(self, P, B):
        """(Np, D) -> (B, Np, D): expand to the batch FIRST, then dropout, so each image has its own mask."""
        return F.dropout(P.expand(B, -1, -1), self.p_drop, training=self.training)

    def features(self, x):
        return _features(self.vit, x, self.pool)

    def split(self, x):
        """[prefix | prompts | patches] -> the three parts."""
        k, n = self.k, self.num_prompts
        return x[:, :k], x[:, k:k + n], x[:, k + n:]


class ReferenceLinearProbe(_Reference):
    def __init__(self, vit, num_classes, pool="model"):
        super().__init__(vit, 0, num_classes, pool=pool)

    def forward(self, images):
        x = _embed(self.vit, images)
        for block in self.vit.blocks:
            x = block(x)
        return self.head(self.features(x))


class ReferenceAdapter(_Reference):
    """Pfeiffer adapters (KMnP/vpt adapter_block.py:60-84): in each block
    x = x + attn(norm1(x));  m = mlp(norm2(x));  x = x + (m + up(gelu(down(m))))."""

    def __init__(self, vit, num_classes, reduction_factor=8, pool="model"):
        super().__init__(vit, 0, num_classes, pool=pool)
        hidden = self.dim // reduction_factor
        self.adapters = nn.ModuleList(
            nn.ModuleDict(dict(down=nn.Linear(self.dim, hidden), up=nn.Linear(hidden, self.dim)))
            for _ in range(self.depth))

    def forward(self, images):
        x = _embed(self.vit, images)
        for block, a in zip(self.vit.blocks, self.adapters):
            x = x + block.ls1(block.attn(block.norm1(x)))
            m = block.mlp(block.norm2(x))
            x = x + block.ls2(m + a["up"](F.gelu(a["down"](m))))
        return self.head(self.features(x))


class ReferenceVPT(_Reference):
    """VPT-shallow: P (Np, D) enters once. VPT-deep: P (L, Np, D); block l sees P[l-1]."""

    def __init__(self, vit, num_prompts, num_classes, deep=True, prompt_dropout=0.0, pool="model"):
        super().__init__(vit, num_prompts, num_classes, prompt_dropout, pool)
        self.deep = deep
        shape = (self.depth, num_prompts, self.dim) if deep else (num_prompts, self.dim)
        self.prompts = nn.Parameter(torch.zeros(shape))

    def forward(self, images):
        x = _embed(self.vit, images)
        B = x.shape[0]
        prefix, patches = x[:, :self.k], x[:, self.k:]
        prompts = None if self.deep else self.batch(self.prompts, B)
        for l, block in enumerate(self.vit.blocks):
            if self.deep:
                prompts = self.batch(self.prompts[l], B)      # replace the prompt slot
            x = block(torch.cat([prefix, prompts, patches], dim=1))
            prefix, prompts, patches = self.split(x)
        return self.head(self.features(x))


def _attention_with_temperature(attn, x, temperature):
    """timm's Attention with the logits q.k^T.scale divided by GaPT's temperature, written out."""
    B, T, C = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale / temperature
    weights = logits.softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, T, C)
    if getattr(attn, "norm", None) is not None:
        out = attn.norm(out)
    return attn.proj(out)


class ReferenceGaPT(_Reference):
    """GaPT (ryongithub/GatedPromptTuning): shallow prompts, a gate per block l < L, a softmax
    temperature per block."""

    def __init__(self, vit, num_prompts, num_classes, gate_init=5.0, prompt_dropout=0.0, pool="model"):
        super().__init__(vit, num_prompts, num_classes, prompt_dropout, pool)
        self.prompts = nn.Parameter(torch.zeros(num_prompts, self.dim))
        self.gate_logits = nn.Parameter(torch.full((self.depth - 1,), -float(gate_init)))
        self.temperatures = nn.Parameter(torch.ones(self.depth))

    def forward(self, images):
        # The official reinit_temp: the parameter itself is clamped, in place, outside autograd.
        self.temperatures.data.copy_(self.temperatures.data.clamp(min=0.01, max=10.0))
        x = _embed(self.vit, images)
        B = x.shape[0]
        prefix, patches = x[:, :self.k], x[:, self.k:]
        prompts = self.batch(self.prompts, B)
        for l, block in enumerate(self.vit.blocks):
            t = self.temperatures[l]
            x_in = torch.cat([prefix, prompts, patches], dim=1)
            h = x_in + block.ls1(_attention_with_temperature(block.attn, block.norm1(x_in), t))
            x = h + block.ls2(block.mlp(block.norm2(h)))
            prefix, prompts_out, patches = self.split(x)
            if l < self.depth - 1:
                g = torch.sigmoid(self.gate_logits[l])
                prompts = g * prompts_out + (1 - g) * prompts
            else:
                prompts = prompts_out
        return self.head(self.features(torch.cat([prefix, prompts, patches], dim=1)))


def kmeans_centroids(patches, num_clusters, steps):
    """Per image: Lloyd's k-means over the N patch tokens, initialised from num_clusters evenly
    spaced patches (indices floor(j*N/Np)); an empty cluster keeps its centroid. Assignments carry
    no gradient; the centroids (means of their patches) do."""
    B, N, D = patches.shape
    out = []
    for b in range(B):
        points = patches[b]                                     # (N, D)
        init = [(j * N) // num_clusters for j in range(num_clusters)]
        centroids = points[init]                                # (Np, D)
        for _ in range(steps):
            dist = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)   # (N, Np)
            assign = dist.argmin(dim=1)
            new = []
            for j in range(num_clusters):
                members = points[assign == j]
                new.append(members.mean(0) if len(members) else centroids[j])
            centroids = torch.stack(new)
        out.append(centroids)
    return torch.stack(out)                                     # (B, Np, D)


def _transformer_layer(layer, x):
    """One pre-norm transformer encoder layer (nn.TransformerEncoderLayer, norm_first, GELU,
    no dropout), written out."""
    B, T, D = x.shape
    H = layer.self_attn.num_heads
    h = F.layer_norm(x, (D,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    q, k, v = F.linear(h, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias).chunk(3, -1)
    q, k, v = (t.reshape(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
    weights = ((q @ k.transpose(-2, -1)) / math.sqrt(D // H)).softmax(-1)
    a = (weights @ v).transpose(1, 2).reshape(B, T, D)
    x = x + layer.self_attn.out_proj(a)
    h = F.layer_norm(x, (D,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    return x + layer.linear2(F.gelu(layer.linear1(h)))


class ReferenceLSPT(_Reference):
    """LSPT, docs/method.md's LSPT section and its ablation options; algorithm A.1 of the paper."""

    def __init__(self, vit, num_prompts, num_classes, cspc="mean", lpc="lstm", lstm_layers=1,
                 shared_lstm=True, kmeans_steps=3, prompt_dropout=0.0, pool="model"):
        super().__init__(vit, num_prompts, num_classes, prompt_dropout, pool)
        self.cspc, self.lpc, self.kmeans_steps = cspc, lpc, kmeans_steps
        self.lstm_layers, self.shared = lstm_layers, shared_lstm
        D, L = self.dim, self.depth
        self.prompts = nn.Parameter(torch.zeros(L, num_prompts, D))
        if lpc == "lstm":
            if shared_lstm and lstm_layers == 1:
                self.lstm = nn.LSTMCell(D, D)
            else:
                n = 1 if shared_lstm else L - 1
                self.lstm = nn.ModuleList(nn.ModuleList(nn.LSTMCell(D, D) for _ in range(lstm_layers))
                                          for _ in range(n))
        elif lpc == "gru":
            self.gru = nn.GRUCell(D, D) if shared_lstm else nn.ModuleList(
                nn.GRUCell(D, D) for _ in range(L - 1))
        elif lpc == "transformer":
            make = lambda: nn.TransformerEncoderLayer(  # noqa: E731
                D, vit.blocks[0].attn.num_heads, dim_feedforward=2 * D, dropout=0.0,
                activation="gelu", batch_first=True, norm_first=True)
            self.transformer = make() if shared_lstm else nn.ModuleList(make() for _ in range(L - 1))

    def _module(self, attr, l):
        """The LPC module used after block l (one shared module, or one per block)."""
        m = getattr(self, attr)
        return m[0 if self.shared else l] if isinstance(m, nn.ModuleList) else m

    def forward(self, images):
        x = _embed(self.vit, images)
        B, D, Np = x.shape[0], self.dim, self.num_prompts
        prefix, patches = x[:, :self.k], x[:, self.k:]
        prompts = self.batch(self.prompts[0], B)                       # X_P^0 = P[0]
        cells = [torch.zeros(B * Np, D, dtype=x.dtype, device=x.device)
                 for _ in range(self.lstm_layers)]                     # C^0 = 0
        for l, block in enumerate(self.vit.blocks):
            x = block(torch.cat([prefix, prompts, patches], dim=1))
            prefix, prompts_hat, patches = self.split(x)               # Xhat_P^l, X^l
            if l == self.depth - 1:
                break                                                  # last prompts are dropped
            P = self.batch(self.prompts[l + 1], B)                     # P[l] in 1-based terms
            # CSPC (eq. 5): the spatial term added to the block's prompt outputs
            if self.cspc == "mean":
                spatial = patches.mean(dim=1, keepdim=True)
            elif self.cspc == "kmeans":
                spatial = kmeans_centroids(patches, Np, self.kmeans_steps)
            else:
                spatial = torch.zeros_like(prompts_hat)
            x_sp = prompts_hat + spatial                               # Xhat_SP^l
            # LPC (eq. 7)
            if self.lpc == "lstm":
                m = self._module("lstm", l)
                layers = [m] if isinstance(m, nn.LSTMCell) else list(m)     # stacked layers
                inp = P.reshape(B * Np, D)
                for j, cell_j in enumerate(layers):
                    h, cells[j] = cell_j(inp, (x_sp.reshape(B * Np, D), cells[j]))
                    inp = h
                prompts = h.reshape(B, Np, D)
            elif self.lpc == "gru":
                h = self._module("gru", l)(P.reshape(B * Np, D), x_sp.reshape(B * Np, D))
                prompts = h.reshape(B, Np, D)
            elif self.lpc == "transformer":
                y = _transformer_layer(self._module("transformer", l), torch.cat([x_sp, P], dim=1))
                prompts = y[:, :Np]
            else:  # "none": X_P^l = P[l] + spatial term
                prompts = P + spatial
        return self.head(self.features(x))
