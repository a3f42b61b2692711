"""Relative position schemes of self-attention (``position_scheme``): what attention adds to
its scores when the embeddings carry no absolute positions.

* ``rotary`` (RoPE, Su et al. 2021; `RotaryPositions`): each query and key is rotated by its
  absolute position, pair (x_k, x_{k + d/2}) by the angle ``position * rope_theta^(-2k/d)``
  (transformers' Llama layout), so that q_i . k_j depends on i - j only. No parameters.
* ``transformer_xl`` (Dai et al. 2019, section 3.3; `TransformerXLPositions`): the score of
  query i on key j is ``(q_i + u) . k_j + (q_i + v) . W_{k,R} R_{i-j}``, the paper's terms
  (a) + (c) and (b) + (d), with R the sinusoid of the distance i - j, W_{k,R} a learned
  projection and u, v learned per head. The (b) + (d) term is an additive bias of the scores.

* ``deberta`` (He et al. 2021; `disentangled.DisentangledPositions`): DeBERTa's content-to-position and
  position-to-content scores over a shared table of relative embeddings.

Each scheme is a module with the two calls `AttentionBranch` makes: ``keys(k, past)`` on the new keys
before they are cached, and ``queries(q, positions, keys, past, content_keys=, projections=)`` -> (queries,
score bias or None); the content keys (all of them, cached ones too) and the attention's (query, key)
Linears are what only DeBERTa's p2c term and ``share_att_key`` read.

A token's position is its index in the sequence plus ``past``, the positions already in a
key/value cache (`kv_cache`), so a cached decoder sees the distances of one forward; padding
counts as positions. The position tables are recomputed at each evaluation of the branch
(each solver stage): O(length x width) beside attention's O(length^2 x width), and no state
that a solve, a compile or a device move could leave stale.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as hf_init

from .disentangled import DisentangledPositions


def positions_from(past: int, length: int, device, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The absolute positions of ``length`` new tokens after ``past`` cached ones: (length,), or with
    ``offsets`` (batch, width) (per-token exit's packed query indices) ``past + offsets``."""
    if offsets is not None:
        return offsets + past
    return torch.arange(past, past + length, device=device)


def _angle_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # fp32 angles under bf16 too, as Llama's


class RotaryPositions(nn.Module):
    """RoPE: ``rotate(x, positions)`` rotates queries or keys (batch, heads, n, head_size)."""

    def __init__(self, config):
        super().__init__()
        self.head_size = config.hidden_size // config.num_attention_heads
        self.theta = float(config.rope_theta)

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of (..., n, head_size) for positions (..., n), each frequency twice (Llama's layout)."""
        work = _angle_dtype(dtype)
        frequencies = self.theta ** (-torch.arange(0, self.head_size, 2, device=positions.device, dtype=work)
                                     / self.head_size)
        angles = positions.to(work)[..., None] * frequencies
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def keys(self, k: torch.Tensor, past: int) -> torch.Tensor:
        """New keys (batch, heads, n, head_size) rotated at their positions past .. past + n - 1 (cached so)."""
        return self.rotate(k, positions_from(past, k.shape[2], k.device))

    def queries(self, q: torch.Tensor, query_positions: torch.Tensor, keys: int, past: int = 0, **_):
        """Queries rotated at their positions; no score bias."""
        return self.rotate(q, query_positions), None

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (batch, heads, n, head_size) at positions (n,) or (batch, n)."""
        cos, sin = self.angles(positions, x.dtype)
        if positions.dim() == 2:  # per batch row: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        half = x.shape[-1] // 2
        turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos + turned * sin).to(x.dtype)


def sinusoid(distances: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Transformer-XL's relative encodings R (n, width) of distances (n,): [sin(d w_k), cos(d w_k)],
    w_k = 10000^(-2k/width) (Vaswani et al.'s frequencies, Transformer-XL's concatenated layout)."""
    work = _angle_dtype(dtype)
    frequencies = 10000.0 ** (-torch.arange(0, width, 2, device=distances.device, dtype=work) / width)
    angles = distances.to(work)[:, None] * frequencies
    return torch.cat((angles.sin(), angles.cos()), dim=-1).to(dtype)


class TransformerXLPositions(nn.Module):
    """Transformer-XL's relative scores: ``content_bias`` is the paper's u, ``position_bias`` its v (heads,
    head_size), ``position_key`` its W_{k,R} (hidden -> hidden, no bias), applied to R of width hidden."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.width = config.hidden_size
        self.content_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_size))
        self.position_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_size))
        self.position_key = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.std = config.initializer_range
        self._bertode_init = "own"  # `init.apply_rule`: the model's `_init_weights` calls reset_parameters
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """u, v and W_{k,R} normal with std ``initializer_range``, as Transformer-XL initialises them."""
        for parameter in (self.content_bias, self.position_bias, self.position_key.weight):
            hf_init.normal_(parameter, std=self.std)  # skips loaded weights (from_pretrained marks them)

    def keys(self, k: torch.Tensor, past: int) -> torch.Tensor:
        """Keys carry no position here: the distances enter through the queries' score bias."""
        return k

    def queries(self, q: torch.Tensor, query_positions: torch.Tensor, keys: int, past: int = 0, **_):
        """For queries q (batch, heads, n, head_size) at positions (n,) or (batch, n), none before ``past``, over
        keys at positions 0 .. keys - 1: the content query q + u, and the position term
        (q + v) . W_{k,R} R_{i-j} / sqrt(head_size) as a score bias (batch, heads, n, keys), so that
        softmax((q + u) k^T / sqrt(d) + bias) is the paper's attention."""
        batch, _, n, _ = q.shape
        # Every distance i - j a query can have to a key, from keys - 1 (the last query, a key itself, on key 0)
        # down to past - (keys - 1) (the first query on the last key: negative with bidirectional attention).
        highest = keys - 1
        distances = torch.arange(highest, past - highest - 1, -1, device=q.device)  # keys + n - 1 of them
        encoded = self.position_key(sinusoid(distances, self.width, q.dtype))  # (L, hidden)
        encoded = encoded.view(-1, self.num_heads, self.head_size).transpose(0, 1)  # (heads, L, head_size)
        by_distance = (q + self.position_bias[:, None].to(q.dtype)) @ encoded.transpose(-1, -2)  # (batch, heads, n, L)
        # The relative shift, as a gather: query i's score on key j is its column of distance i - j, highest - (i - j).
        columns = highest - query_positions[..., :, None] + torch.arange(keys, device=q.device)
        columns = columns.expand(batch, n, keys)[:, None].expand(batch, self.num_heads, n, keys)
        return q + self.content_bias[:, None].to(q.dtype), by_distance.gather(-1, columns) / math.sqrt(self.head_size)


RELATIVE_SCHEMES = {"rotary": RotaryPositions, "transformer_xl": TransformerXLPositions,
                    "deberta": DisentangledPositions}


def relative_positions(config) -> nn.Module | None:
    """The attention's position module of ``config.position_scheme``; None for the absolute schemes (the
    embeddings add them)."""
    scheme = RELATIVE_SCHEMES.get(getattr(config, "position_scheme", "absolute"))
    return scheme(config) if scheme is not None else None
