"""DeBERTa's disentangled attention (He et al. 2021) as a relative position scheme
(``position_scheme="deberta"``, `positions.py`'s interface).

The score of query i on key j is ``(q_i . k_j + q_i . K_r[d] + k_j . Q_r[d]) / sqrt(head_size * s)``:
content-to-content, content-to-position (``c2p``) and position-to-content (``p2c``), with
``d = i - j`` (v2: its log bucket, ``position_buckets``) clamped to the table's span, ``K_r``/``Q_r``
the relative embeddings projected by ``pos_key_proj``/``pos_query_proj`` (``share_att_key``: by the
attention's own key/query projections), and ``s = 1 + len(pos_att_type)``. `DisentangledPositions`
returns the queries scaled by ``1 / sqrt(s)`` and the two position terms as a score bias, so that the
branch's ``softmax(q k^T / sqrt(head_size) + bias)`` is DeBERTa's.

The table of relative embeddings (``2 * span`` rows, ``span`` = ``position_buckets`` or
``max_relative_positions``) is the encoder's, shared by every layer as in DeBERTa: one
`RelativeEmbeddings` (``encoder.rel_embeddings``, with v2's ``norm_rel_ebd="layer_norm"``), which
`share_relative_embeddings` hands to each layer's scheme (unregistered there: saved once).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as hf_init


def resolved_max_relative(config) -> int:
    """DeBERTa's rule: ``max_relative_positions < 1`` means ``max_position_embeddings``."""
    value = getattr(config, "max_relative_positions", -1)
    return value if value >= 1 else config.max_position_embeddings


def table_span(config) -> int:
    """Half the table's rows: ``position_buckets`` when bucketing, else the largest relative distance."""
    buckets = getattr(config, "position_buckets", -1)
    return buckets if buckets > 0 else resolved_max_relative(config)


def log_buckets(relative: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """DeBERTa-v2's log buckets of relative distances: |d| < buckets / 2 kept, farther ones on a log
    scale up to ``max_position`` (float32 arithmetic, as transformers' ``make_log_bucket_position``)."""
    sign = torch.sign(relative)
    mid = buckets // 2
    near = (relative < mid) & (relative > -mid)
    absolute = torch.where(near, torch.tensor(mid - 1, device=relative.device).type_as(relative), relative.abs())
    ratio = torch.log(torch.tensor((max_position - 1) / mid, device=relative.device))
    logarithmic = torch.ceil(torch.log(absolute / mid) / ratio * (mid - 1)) + mid
    return torch.where(absolute <= mid, relative.type_as(logarithmic), logarithmic * sign).long()


class RelativeEmbeddings(nn.Module):
    """The shared table (2 * span, hidden), LayerNorm-ed when ``norm_rel_ebd="layer_norm"`` (DeBERTa-v2)."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2 * table_span(config), config.hidden_size))
        normed = getattr(config, "norm_rel_ebd", None) == "layer_norm"
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if normed else None
        self.std = config.initializer_range
        self._bertode_init = "own"  # `init.apply_rule`: the model's `_init_weights` calls reset_parameters
        self.reset_parameters()

    def reset_parameters(self) -> None:
        hf_init.normal_(self.weight, std=self.std)  # an nn.Embedding's init, as DeBERTa's table; skips loaded weights

    def forward(self) -> torch.Tensor:
        return self.norm(self.weight) if self.norm is not None else self.weight


class DisentangledPositions(nn.Module):
    """One layer's c2p/p2c projections (``pos_key_proj``, ``pos_query_proj``; none with ``share_att_key``)."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        terms = config.pos_att_type if config.pos_att_type is not None else ["c2p", "p2c"]
        self.c2p, self.p2c = "c2p" in terms, "p2c" in terms
        self.scale_factor = 1 + len(terms)
        self.buckets = getattr(config, "position_buckets", -1)
        self.max_relative = resolved_max_relative(config)
        self.share_att_key = bool(getattr(config, "share_att_key", False))
        if not self.share_att_key:
            self.pos_key_proj = nn.Linear(config.hidden_size, config.hidden_size) if self.c2p else None
            self.pos_query_proj = nn.Linear(config.hidden_size, config.hidden_size) if self.p2c else None
        self.__dict__["table"] = None  # the encoder's `RelativeEmbeddings` (`share_relative_embeddings`)

    def shared_parameters(self):
        """The shared table's parameters, which this scheme reads but does not own (an adjoint's business)."""
        return self.table.parameters() if self.table is not None else iter(())

    def keys(self, k: torch.Tensor, past: int) -> torch.Tensor:
        """Keys carry no position: both position terms enter through the queries' score bias."""
        return k

    def queries(self, q: torch.Tensor, query_positions: torch.Tensor, keys: int, past: int = 0,
                content_keys: torch.Tensor | None = None, projections=None):
        """Queries (batch, heads, n, head_size) at positions (n,) or (batch, n) over ``content_keys`` (batch,
        heads, keys, head_size) at positions 0 .. keys - 1; ``projections``: the attention's (query, key)
        Linears (``share_att_key``). Returns q / sqrt(s) and the c2p + p2c scores / sqrt(head_size * s)."""
        if self.table is None:
            raise RuntimeError("DisentangledPositions has no relative embeddings: build the encoder with "
                               "bertode.layers.deq.build_encoder (it shares the encoder's table)")
        batch, heads, n, _ = q.shape
        relative = query_positions[..., :, None] - torch.arange(keys, device=q.device)  # (n | batch n, keys)
        table = self.table()
        if self.buckets > 0:
            span = self.buckets
            relative = log_buckets(relative, self.buckets, self.max_relative)
        else:  # only the rows these distances reach, as DeBERTa (v1) slices them: the same scores
            span = min(keys, self.max_relative)
            table = table[self.max_relative - span:self.max_relative + span]
        index = torch.clamp(relative + span, 0, 2 * span - 1)
        index = (index[None, None] if index.dim() == 2 else index[:, None]).expand(batch, heads, n, keys)
        query_proj, key_proj = projections if self.share_att_key else (self.pos_query_proj, self.pos_key_proj)
        score = torch.zeros((), dtype=q.dtype, device=q.device)
        if self.c2p:  # q_i . K_r[d(i, j)]
            by_distance = q @ self._heads(key_proj(table.to(q.dtype))).transpose(-1, -2)  # (batch, heads, n, rows)
            score = score + by_distance.gather(-1, index)
        if self.p2c:  # k_j . Q_r[d(i, j)]: key j's column of distance d(i, j)
            by_distance = content_keys @ self._heads(query_proj(table.to(q.dtype))).transpose(-1, -2)  # (., keys, rows)
            score = score + by_distance.transpose(-1, -2).gather(-2, index)
        scale = math.sqrt(self.head_size * self.scale_factor)
        return q / math.sqrt(self.scale_factor), (score / scale).expand(batch, heads, n, keys)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) -> (heads, rows, head_size)."""
        return x.view(x.shape[0], self.num_heads, self.head_size).transpose(0, 1)


def share_relative_embeddings(encoder: nn.Module, config) -> nn.Module:
    """With ``position_scheme="deberta"``: give ``encoder`` the shared table (``encoder.rel_embeddings``, as
    DeBERTa names it) and every `DisentangledPositions` inside it a reference to it. The encoder itself otherwise."""
    if getattr(config, "position_scheme", None) != "deberta":
        return encoder
    encoder.rel_embeddings = RelativeEmbeddings(config)
    for module in encoder.modules():
        if isinstance(module, DisentangledPositions):
            module.__dict__["table"] = encoder.rel_embeddings  # not registered: one copy, saved under the encoder
    return encoder
