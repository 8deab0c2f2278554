"""The ImageGPT transformer, readable top to bottom.

A GPT-2-style decoder over colour tokens in raster order, exactly as Chen et al. (2020) and the released
checkpoints: pre-norm blocks whose norm has no mean-centring and no bias, quick-GELU MLPs, causal attention
scaled by 1/sqrt(head_dim), learned position embeddings, an output head untied from the embeddings that never
predicts SOS, and SOS = vocab_size - 1.

Two levels of API:
- `forward(input_ids, labels=...)` keeps transformers' semantics: ids are used as given and the loss is the
  shifted next-token cross-entropy. This is what parity with transformers is checked on.
- `loss_per_image(ids)` and friends take image tokens [x0, ..., x_{n-1}] and feed [SOS, x0, ..., x_{n-2}], as
  the released models were trained, so every token of the image is predicted.

The same network is the paper's BERT model when `config.objective == "bert"`: attention is not causal, the
model reads the image tokens themselves (no SOS), `mask=` zeroes the token embeddings of masked positions, and
the loss is the cross-entropy at the masked positions (`bert_loss_per_image`; imagegpt.objectives draws the
masks).

Module and parameter names mirror transformers' (transformer.h.{i}.attn.c_attn, ...): checkpoint conversion is
a transpose of the linear weights. imagegpt.cpu runs CPU decode steps on these weights from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ImageGPTConfig
from .errors import ArgumentError
from .objectives import bert_loss_per_image, evaluation_masks
from .pretrained import CAUSAL_LM_ARCHITECTURE, CLASSIFIER_ARCHITECTURE, Pretrained


def sos_inputs(ids: torch.Tensor, sos_id: int) -> torch.Tensor:
    """[x0, ..., x_{n-1}] -> [SOS, x0, ..., x_{n-2}]: the input whose next-token targets are the image."""
    sos = torch.full_like(ids[:, :1], sos_id)
    return torch.cat([sos, ids[:, :-1]], dim=1)


def image_inputs(ids: torch.Tensor, config: ImageGPTConfig) -> torch.Tensor:
    """What the model reads for image tokens [x0, ..., x_{n-1}]: [SOS, x0, ..., x_{n-2}] for the next-pixel
    objective, the tokens themselves for BERT models (read with the masked positions' embeddings zeroed)."""
    return sos_inputs(ids, config.sos_id) if config.is_causal else ids


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The original iGPT's activation, transformers' "quick_gelu"; MLP has it as silu(1.702 x) / 1.702."""
    return x * torch.sigmoid(1.702 * x)


def scaled_linear(x: torch.Tensor, linear: nn.Linear, scale: float, bias_scale: float = 1.0) -> torch.Tensor:
    """scale * x W^T + bias_scale * b: F.linear with both scales applied inside the one BLAS call."""
    out = torch.addmm(linear.bias, x.flatten(0, -2), linear.weight.t(), beta=bias_scale, alpha=scale)
    return out.view(*x.shape[:-1], -1)


class Norm(nn.Module):
    """ImageGPT's layer norm: x / sqrt(mean(x^2) + eps) * weight. No mean-centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


# ---- the KV cache ----


class KVCache:
    """Preallocated keys and values, one (B, nh, max_length, hs) tensor of each per layer, as gpt-fast's (one
    per layer lets torch.compile update each in place). zeroed=False leaves the memory uninitialised: fine for
    int positions, which only ever read positions written; a static step (tensor positions) reads the whole
    cache under a mask and needs finite values. imagegpt.quantize.Int8KVCache stores int8 rows instead.
    """

    quantized = False  # Int8KVCache's rows are int8, with a scale each

    def __init__(self, config: ImageGPTConfig, batch_size: int, max_length: int | None = None,
                 device=None, dtype: torch.dtype = torch.float32, zeroed: bool = True):  # fmt: skip
        max_length = config.n_positions if max_length is None else max_length
        shape = (batch_size, config.n_head, max_length, config.head_dim)
        if not (dtype.is_floating_point or self.quantized):
            raise ArgumentError(f"a KVCache holds float rows, not {dtype}; int8: quantize.Int8KVCache")
        new = torch.zeros if zeroed else torch.empty
        self.k = [new(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [new(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def max_length(self) -> int:
        return self.k[0].size(2)

    def write(self, layer: int, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, nh, T, hs) at positions pos, pos + 1, ... (an int) or at a tensor's T positions."""
        at = slice(pos, pos + k.size(2)) if isinstance(pos, int) else pos
        self.k[layer][:, :, at] = k.to(self.k[layer].dtype)
        self.v[layer][:, :, at] = v.to(self.v[layer].dtype)

    def read(self, layer: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values at positions [0, end) (None: all)."""
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def update(self, layer: int, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """write(), then the keys and values to attend over: positions [0, pos + T) for an int pos, the whole
        cache (under the mask of mask(pos)) for a tensor of positions, whose shapes never change."""
        self.write(layer, pos, k, v)
        return self.read(layer, pos + k.size(2) if isinstance(pos, int) else None)

    def attend(self, layer: int, pos, q, k, v, mask=None, dropout: float = 0.0) -> torch.Tensor:
        """Attention of q (B, nh, T, hs) over the cache once k, v are stored at pos: what attention with a
        cache does. A cache that stores its keys in its own way (imagegpt.cpu's) attends in its own way."""
        keys, values = self.update(layer, pos, k, v)
        return attention(q, keys, values, mask, dropout)

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(T, max_length) bool: the query at each of `positions` sees the cached positions up to its own."""
        return torch.arange(self.max_length, device=positions.device) <= positions[:, None]


# ---- the transformer ----


def attention(q, k, v, mask: torch.Tensor | None = None, dropout: float = 0.0, causal: bool = True):
    """softmax(q k^T / sqrt(hs)) v through SDPA, which never materialises the T x S matrix.

    q is (B, nh, T, hs), k and v (B, nh, S, hs). Without a mask the queries are the last T of the S positions
    (S > T when a KV cache holds earlier ones), each seeing the keys up to its own position; causal=False
    (BERT models, no cache) lets every query see every key.
    """
    if k.dtype != q.dtype:  # a cache kept in another precision than the compute: read it in q's
        k, v = k.to(q.dtype), v.to(q.dtype)
    T, S = q.size(-2), k.size(-2)
    if mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ImageGPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.attn_pdrop = config.attn_pdrop
        self.is_causal = config.is_causal  # False for BERT models: "no attention logit masking is required"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, kv_cache: KVCache | None = None, pos: int | torch.Tensor = 0, mask=None):
        """x (B, T, C) at positions pos.. (see KVCache.update); mask: the static step's, else causal."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        dropout = self.attn_pdrop if self.training else 0.0
        if kv_cache is None:
            y = attention(q, k, v, mask, dropout, self.is_causal)  # (B, nh, T, hs)
        else:  # k and v stored at pos, q attending over every position cached so far
            y = kv_cache.attend(self.layer_idx, pos, q, k, v, mask, dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # c_proj(quick_gelu(c_fc(x))) with quick_gelu(z) = silu(1.702 z) / 1.702, both scales inside the
        # matrix multiplies: one fused silu pass over the widest tensor instead of three (a forward ~10%
        # faster on a CPU, docs/performance.md)
        h = scaled_linear(x, self.c_fc, 1.702, 1.702)
        h = F.silu(h, inplace=not h.requires_grad)  # 1.702 quick_gelu(c_fc(x)); no new buffer at inference
        return self.dropout(scaled_linear(h, self.c_proj, 1 / 1.702))


class Block(nn.Module):
    def __init__(self, config: ImageGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = Norm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache: KVCache | None = None, pos: int | torch.Tensor = 0, mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, pos, mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Embeddings, blocks and the final norm: everything but the head."""

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        # Left uninitialised here (init_weights draws them): nn.Embedding's own normal_ init costs seconds of
        # one-time imports on the meta device, where checkpoint loading builds the model.
        self.wte = nn.Embedding(
            config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd)
        )
        self.wpe = nn.Embedding(
            config.n_positions, config.n_embd, _weight=torch.empty(config.n_positions, config.n_embd)
        )
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = Norm(config.n_embd, config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def embed(self, input_ids: torch.Tensor, pos: int | torch.Tensor = 0, mask=None) -> torch.Tensor:
        """Token plus position embeddings (B, T, C) of ids at positions pos.. (an int) or at a tensor's.
        mask (B, T) bool, BERT models': the token embeddings of masked positions are zeroed, their position
        embeddings still added, as in the original code."""
        T = input_ids.size(1)
        if isinstance(pos, int):
            if pos + T > (n := self.wpe.num_embeddings):
                raise ValueError(f"sequence of {pos + T} positions exceeds the model's n_positions={n}")
            pos = torch.arange(pos, pos + T, device=input_ids.device)
        tokens = self.wte(input_ids)  # (B, T, C)
        if mask is not None:
            tokens = tokens.masked_fill(mask.unsqueeze(-1), 0.0)
        return self.drop(tokens + self.wpe(pos))

    def forward(self, input_ids, kv_cache: KVCache | None = None, start: int | torch.Tensor = 0,
                output_hidden_states: bool = False, mask=None):  # fmt: skip
        """The final normed hidden state (B, T, C) and, if asked, the n_layer + 1 hidden states.

        As in transformers, hidden_states[i] is the input of block i for i < n_layer, and the last entry is
        the output of the final norm. start: the first position (an int), or a (T,) tensor of positions with
        a cache (a static-shape decode step, attending over the whole cache under a mask, as gpt-fast's).
        mask: BERT models' masked positions (see embed).
        """
        x = self.embed(input_ids, start, mask)
        static = kv_cache is not None and not isinstance(start, int)
        attn_mask = kv_cache.mask(start) if static else None
        hidden_states = []
        for block in self.h:
            if output_hidden_states:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache, start, attn_mask)
        x = self.ln_f(x)
        return x, (*hidden_states, x) if output_hidden_states else None

    def norm_at(self, layer: int) -> Norm:
        """The norm that reads layer `layer`'s activation: block layer's ln_1, or ln_f at n_layer."""
        return self.ln_f if layer == len(self.h) else self.h[layer].ln_1

    def forward_intermediates(self, input_ids, layers, norm: bool = True, stop_early: bool = True,
                              pool: bool = False, mask=None):  # fmt: skip
        """The activations at `layers` in one pass, as timm's: (final, [one per layer, in the order given]).

        Layer L < n_layer is the input of block L, layer n_layer the last block's output. norm=True returns
        each as the model reads it, normed by norm_at(L) (the probe's and the fine-tuning head's n^L).
        pool=True averages each over positions, in float32: (B, C) instead of (B, T, C). stop_early=True runs
        only the blocks below the deepest layer asked and `final` is None; otherwise final is forward()'s
        (B, T, C). mask: BERT models' masked positions (see embed).
        """
        layers = [int(layer) for layer in layers]
        if not layers or not all(0 <= layer <= len(self.h) for layer in layers):
            raise ValueError(f"layers must lie in [0, {len(self.h)}], got {layers}")
        last = max(layers) if stop_early else len(self.h)
        taken = {}
        x = self.embed(input_ids, 0, mask)
        for layer in range(last + 1):
            if layer in layers:
                h = self.norm_at(layer)(x) if norm else x
                taken[layer] = h.mean(dim=1, dtype=torch.float32) if pool else h
            if layer < last:
                x = self.h[layer](x)
        final = None if stop_early else self.ln_f(x)
        return final, [taken[layer] for layer in layers]


# ---- the models ----


@dataclass
class ImageGPTOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


ClassifierOutput = ImageGPTOutput  # the classifier's logits are (B, num_labels)


def init_weights(model: nn.Module, config: ImageGPTConfig) -> None:
    """The original code's initialisation, which the paper reports matters for stable training."""
    if any(p.is_meta for p in model.parameters()):
        return  # built on the meta device to receive a checkpoint's weights: nothing to draw
    for name, p in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            nn.init.ones_(p)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)
        elif name.endswith("wpe.weight"):
            nn.init.normal_(p, std=0.01)
        elif name.endswith("wte.weight") or ".mlp." in name:
            nn.init.normal_(p, std=0.02)
        elif name.endswith("attn.c_attn.weight"):
            nn.init.normal_(p, std=1.0 / math.sqrt(config.n_embd))
        elif name.endswith("attn.c_proj.weight"):
            nn.init.normal_(p, std=1.0 / math.sqrt(config.n_embd * config.n_layer))
        elif name in ("lm_head.weight", "score.weight"):
            nn.init.zeros_(p)
        else:  # pragma: no cover - a new parameter must be given its initialisation here
            raise AssertionError(f"no initialisation rule for parameter {name}")


class ImageGPT(Pretrained):
    """The backbone plus the next-token head (transformers' ImageGPTForCausalImageModeling)."""

    architecture = CAUSAL_LM_ARCHITECTURE

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        # vocab_size - 1 outputs: SOS is never predicted. Untied from wte.
        self.lm_head = nn.Linear(config.n_embd, config.n_clusters, bias=False)
        init_weights(self, config)

    def forward(self, input_ids, labels=None, output_hidden_states: bool = False,
                kv_cache: KVCache | None = None, start: int | torch.Tensor = 0, mask=None):  # fmt: skip
        """transformers' semantics: ids used as given; loss = CE(logits[:, :-1], labels[:, 1:]).

        BERT models: mask (B, T) bool, True where masked, zeroes those positions' token embeddings, and the
        loss is L_BERT of labels at the masked positions (bert_loss_per_image, averaged over the batch).
        """
        x, hidden_states = self.transformer(input_ids, kv_cache, start, output_hidden_states, mask)
        logits = self.lm_head(x)  # (B, T, n_clusters)
        loss = None
        if labels is not None and self.config.is_causal:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        elif labels is not None:
            if mask is None:
                raise ArgumentError("a BERT model's loss is over its masked positions: pass mask= as well")
            loss = bert_loss_per_image(logits, labels, mask).mean()
        return ImageGPTOutput(logits=logits, loss=loss, hidden_states=hidden_states)

    def forward_intermediates(self, input_ids, layers, norm=True, stop_early=True, pool=False, mask=None):
        """Transformer.forward_intermediates on ids used as given (images: feed image_inputs(ids, config))."""
        return self.transformer.forward_intermediates(input_ids, layers, norm, stop_early, pool, mask)

    def loss_per_image(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss in nats of each image (B,) under the model's objective.

        Next-pixel: every token of ids predicted from [SOS, ...]. BERT: the tokens at `mask` (B, T), True
        where masked, predicted from the others; by default the fixed evaluation masks of images 0..B-1
        (imagegpt.objectives.evaluation_masks), so that repeated calls agree.
        """
        if not self.config.is_causal:
            if mask is None:
                mask = evaluation_masks(self.config, range(len(ids))).to(ids.device)
            return bert_loss_per_image(self(ids, mask=mask).logits, ids, mask)
        logits = self(sos_inputs(ids, self.config.sos_id)).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none")
        return nll.view(ids.shape).mean(dim=1)

    def image_loss(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The training objective's loss in nats for the batch: next-pixel, the mean over all tokens, SOS
        handled; BERT, the mean over images of loss_per_image(ids, mask)."""
        if not self.config.is_causal:
            return self.loss_per_image(ids, mask).mean()
        logits = self(sos_inputs(ids, self.config.sos_id)).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())


class ImageGPTClassifier(Pretrained):
    """The backbone plus a linear `score` head on the position-averaged final normed hidden state.

    Matches transformers' ImageGPTForImageClassification, whose input ids are used as given: to read images as
    the released models were trained, feed `sos_inputs(ids, sos_id)` (imagegpt's fine-tuning does).
    """

    architecture = CLASSIFIER_ARCHITECTURE

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        init_weights(self, config)

    def forward(self, input_ids, labels=None, output_hidden_states: bool = False, mask=None):
        """mask: BERT models' masked positions (see ImageGPT.forward)."""
        x, hidden_states = self.transformer(input_ids, None, 0, output_hidden_states, mask)
        logits = self.score(x.mean(dim=1))  # (B, num_labels)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(logits=logits, loss=loss, hidden_states=hidden_states)

    def forward_intermediates(self, input_ids, layers, norm=True, stop_early=True, pool=False, mask=None):
        """Transformer.forward_intermediates on ids used as given."""
        return self.transformer.forward_intermediates(input_ids, layers, norm, stop_early, pool, mask)
