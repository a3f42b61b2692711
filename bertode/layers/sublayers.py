"""The two sublayer branches of a BERT layer, G_A (attention) and G_F (feed-forward).

A branch is the part of an Add & Norm residual that is neither the addition nor the
LayerNorm: ``a = LN_A(x + G_A(x))``, ``y = LN_F(a + G_F(a))``. Branches return their
output *before* hidden dropout; whoever adds the residual applies dropout (a fresh
mask per call, one mask per solve inside an ODE, one per forward in a DEQ; `encoder.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..solve import observe
from . import kv_cache
from .dropout import keep_mask, splitting_rows
from . import segment_memory
from .positions import positions_from, relative_positions


class AttentionBranch(nn.Module):
    """G_A(x) = W_O · MultiHeadSelfAttention(x) with PyTorch's fused SDPA kernel; with a relative
    ``position_scheme`` (`positions.py`) its ``positions`` rotate queries and keys or bias the scores."""

    positional = True  # self-attention reads positions; cross-attention's keys are the encoder's (no distances)

    def __init__(self, config, attention_dropout: float | None = None):
        """``attention_dropout`` (default: the config's ``attention_probs_dropout_prob``) is
        the probability used in training; the encoder passes 0 where the map must be one
        deterministic function during a solve (DEQ)."""
        super().__init__()
        self.config = config  # read at call time: attn_implementation may change after construction
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.attention_dropout = (config.attention_probs_dropout_prob if attention_dropout is None
                                  else attention_dropout)
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.positions = relative_positions(config) if self.positional else None

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor | None = None,
                qkv_injection: torch.Tensor | None = None, active: torch.Tensor | None = None) -> torch.Tensor:
        """``qkv_injection`` (batch, seq, 3 * hidden) is added to the Q, K, V projections (DEQ input injection).
        ``active`` (`loop.ActiveTokens`): only those tokens query (packed per batch row to the widest
        row's count), and only their rows come back, (n_active, hidden); every token supplies keys and
        values (per-token exit). Under a key/value cache (`kv_cache`) the keys and values are the cached
        past's followed by these tokens'."""
        batch, seq, width = hidden.shape
        k, v = self.key(hidden), self.value(hidden)
        dq = None
        if qkv_injection is not None:
            dq, dk, dv = qkv_injection.chunk(3, dim=-1)
            k, v = k + dk, v + dv
        k, v = self.heads(k), self.heads(v)
        session = kv_cache.active()
        past = session.past if session is not None else 0  # the new tokens follow the cached positions
        remembered = self.remembered() if self.positional else None
        if remembered is not None:  # the previous segment's states, keys and values first (`segment_memory`)
            past = remembered.shape[1]
        if self.positions is not None:  # RoPE's keys are rotated at their own positions, and cached so
            k = self.positions.keys(k, past)
        if session is not None:
            k, v = session.keys_values(k, v)
        if remembered is not None:
            remembered, injected = remembered[..., :width], remembered[..., width:]
            mem_k, mem_v = self.key(remembered), self.value(remembered)
            if injected.shape[-1]:  # a DEQ's Q/K/V injection of the remembered positions
                _, inject_k, inject_v = injected.chunk(3, dim=-1)
                mem_k, mem_v = mem_k + inject_k, mem_v + inject_v
            mem_k, mem_v = self.heads(mem_k), self.heads(mem_v)
            mem_k = self.positions.keys(mem_k, 0) if self.positions is not None else mem_k
            k, v = torch.cat([mem_k, k], dim=2), torch.cat([mem_v, v], dim=2)
        keys = k.shape[2]
        if active is None:
            q = self.query(hidden)
            q = q + dq if dq is not None else q
        else:
            q = self.query(active.gather(hidden))
            q = active.pad(q + active.gather(dq) if dq is not None else q)  # (batch, width, hidden): each row's active queries, left-packed
            if attn_mask is not None and attn_mask.shape[-2] > 1:  # a causal mask: the active queries' rows
                attn_mask = attn_mask.expand(batch, -1, -1, -1).gather(
                    2, active.positions[:, None, :, None].expand(-1, attn_mask.shape[1], -1, keys))
        q, bias = self.heads(q), None
        if self.positions is not None:  # RoPE rotates them; Transformer-XL, DeBERTa add a score bias
            query_positions = positions_from(past, seq, q.device, None if active is None else active.positions)
            q, bias = self.positions.queries(q, query_positions, keys, past, content_keys=k,
                                             projections=(self.query, self.key))
        context = self.attend(q, k, v, attn_mask, bias=bias,
                              unpack=None if active is None else lambda probs: active.unpack_queries(probs, seq))
        return self.dense(context if active is None else context[active.packed])

    @staticmethod
    def remembered() -> torch.Tensor | None:
        """The segment memory of the layer running now (batch, m, hidden), or None."""
        memory = segment_memory.active()
        return memory.states() if memory is not None else None

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, heads, seq, head_size)."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_size).transpose(1, 2)

    def attend(self, q, k, v, attn_mask, cross: bool = False, unpack=None, bias=None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + bias + mask) v with heads merged: (batch, queries, hidden); ``bias``
        (batch, heads, queries, keys): Transformer-XL's position scores, masked into one float mask. Eager where the
        probabilities are wanted (``output_attentions``, or ``attn_implementation="eager"``) or the dropout mask
        must come from `bertode.layers.dropout`; PyTorch's fused SDPA otherwise."""
        batch, _, queries, _ = q.shape
        p = self.attention_dropout if self.training else 0.0
        observer = observe.active()
        recorded = observer is not None and observer.needs_attention(cross)
        if bias is not None:
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, torch.finfo(bias.dtype).min)
        if recorded or (p > 0 and splitting_rows()) or getattr(self.config, "_attn_implementation", None) == "eager":
            context, probs = eager_attention(q, k, v, attn_mask, p)
            if recorded:
                observer.attention(probs if unpack is None else unpack(probs), cross)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return context.transpose(1, 2).reshape(batch, queries, self.num_heads * self.head_size)


class CrossMemory:
    """What a cross-attention site attends to: the encoder's states (batch, source, hidden) and its
    SDPA mask (batch, 1, 1, source) or None. It takes the place of a self-attention site's mask."""

    def __init__(self, states: torch.Tensor, mask: torch.Tensor | None):
        self.states, self.mask = states, mask


class CrossAttentionBranch(AttentionBranch):
    """G_C(x) = W_O · MultiHeadAttention(queries from x; keys and values from the encoder's states), the
    decoder's second sublayer (``add_cross_attention``). Its keys and values depend on the encoder only, so
    under an encoder-decoder cache they are computed at the first forward and read after. It reads no positions
    (no distance between a target and a source token is defined), whatever ``position_scheme``."""

    positional = False

    def forward(self, hidden: torch.Tensor, memory: CrossMemory, qkv_injection=None, active=None) -> torch.Tensor:
        states = memory.states.to(hidden.dtype)

        def keys_values():
            return self.heads(self.key(states)), self.heads(self.value(states))

        session = kv_cache.active()
        k, v = session.cross_keys_values(keys_values) if session is not None else keys_values()
        return self.dense(self.attend(self.heads(self.query(hidden)), k, v, memory.mask, cross=True))


def eager_attention(q, k, v, attn_mask: torch.Tensor | None, dropout_p: float = 0.0):
    """softmax(q k^T / sqrt(d) + mask) v, written out: (context, attention probabilities
    before dropout). ``attn_mask`` is SDPA's: boolean (True = attend) or a float mask added to the scores."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask
    elif attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1)
    kept = probs * keep_mask(probs, dropout_p) if dropout_p > 0 else probs
    return kept @ v, probs


class FeedForwardBranch(nn.Module):
    """G_F(x) = W_2 · act(W_1 x + b_1) + b_2."""

    per_token = True  # each token's update reads that token only: exited tokens can be left out

    def __init__(self, config):
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor | None = None, qkv_injection=None) -> torch.Tensor:
        return self.dense(self.activation(self.intermediate(hidden)))


def sdpa_mask(attention_mask: torch.Tensor | None, causal: bool = False, length: int | None = None,
              device: torch.device | None = None, past: int = 0) -> torch.Tensor | None:
    """(batch, keys) 1/0 padding mask -> boolean SDPA mask (True = attend): (batch, 1, 1, keys),
    or with ``causal`` (a decoder, ``config.is_decoder``) (batch or 1, 1, queries, keys) where
    query i attends to keys <= past + i; None if nothing is masked. ``past``: positions already in a
    key/value cache (`kv_cache`), which the queries (the last ``length`` positions) follow; the padding
    mask then spans past and new positions, as transformers' ``generate`` passes it.

    Boolean, not additive, so the same mask serves fp32 and bf16-autocast attention. Every
    evaluation of a sublayer (each solver stage, adjoint and DEQ solve) receives this mask,
    so causality holds wherever the layer is evaluated. A query with no key left (a padded
    first position) attends to itself, so that its softmax is not NaN (its output is ignored). The
    all-ones test reads the mask on the host; a compiled model keeps the mask instead, so
    its graph does not break there.
    """
    padding = attention_mask
    if padding is not None and not torch.compiler.is_compiling() and bool(padding.all()):
        padding = None
    if not causal:
        return None if padding is None else padding[:, None, None, :].to(torch.bool)
    queries = attention_mask.shape[1] - past if attention_mask is not None else length
    if padding is None and queries == 1:  # the newest position attends to every key
        return None
    keys = past + queries
    device = attention_mask.device if attention_mask is not None else device
    mask = torch.ones(keys, keys, dtype=torch.bool, device=device).tril()[None, None, past:]
    if padding is not None:
        mask = mask & padding[:, None, None, :].to(torch.bool)
        own = torch.eye(keys, dtype=torch.bool, device=device)[past:]
        mask = mask | (own & ~mask.any(-1, keepdim=True))
    return mask
