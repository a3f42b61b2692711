"""The parts of a BERT-family model around the encoder: embeddings, pooler, MLM head.

One class each, covering the family's variants through config fields, so a converted
RoBERTa, ELECTRA, ALBERT or DistilBERT computes exactly what its source computes:

* `BertODEEmbeddings`: word + position (+ token type, unless ``type_vocab_size=0``:
  DistilBERT) embeddings of width ``embedding_size``, LayerNorm, dropout, then (ALBERT,
  ELECTRA) a projection to ``hidden_size`` (DeBERTa's, ``embedding_projection="before_norm"``: bias-free,
  before the LayerNorm). ``position_scheme="after_padding"`` numbers
  positions as RoBERTa does: from ``pad_token_id + 1`` over non-padding tokens, padding
  at ``pad_token_id``. The relative schemes (``rotary``, ``transformer_xl``, ``deberta``) have no position
  embedding: attention reads the positions (`positions.py`), except DeBERTa's with ``position_biased_input``
  (absolute positions added too).
* `BertODEPooler`: dense + ``pooler_hidden_act`` on the first token (tanh for BERT, RoBERTa
  and ALBERT; gelu for ELECTRA's and relu for DistilBERT's classification heads).
* `BertODEMLMHead`: dense (hidden -> embedding width) + ``head_hidden_act`` + LayerNorm,
  then the decoder tied to the word embeddings, and a bias; with ``lm_head_type="linear"``
  (GPT-2) the tied decoder alone, without a bias; with ``"adaptive"`` Transformer-XL's adaptive
  softmax, and an adaptive input embedding as ``word_embeddings`` (`adaptive.py`). Its
  `_Predictions.scored` is sparse prediction's path: the transform and the decoder's cross-entropy at the scored rows only,
  through `losses.linear_cross_entropy` (the kernel that ran: ``loss_kernel``).

GPT-2's embeddings are these with ``type_vocab_size=0`` and ``embedding_norm=False`` (no
LayerNorm: its layers normalise their own inputs).

Parameter names are BERT's (``embeddings.word_embeddings``, ``pooler.dense``,
``cls.predictions.transform.dense``, ...), so models saved before these classes load.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .adaptive import AdaptiveEmbedding, AdaptivePredictions
from .dropout import Dropout
from .losses import linear_cross_entropy
from .positions import RELATIVE_SCHEMES


def embedding_width(config) -> int:
    return config.embedding_size or config.hidden_size


def projects_embeddings(config) -> bool:
    """Whether a Linear maps the embeddings to ``hidden_size`` (None: when the widths differ)."""
    if config.embedding_projection is not None:
        return bool(config.embedding_projection)
    return embedding_width(config) != config.hidden_size


class BertODEEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        width = embedding_width(config)
        self.position_scheme = config.position_scheme
        self.padding_idx = config.pad_token_id if config.pad_token_id is not None else 0
        self.word_embeddings = AdaptiveEmbedding(config) if config.lm_head_type == "adaptive" else \
            nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        # RoBERTa's padding position is pad_token_id, whose embedding gets no gradient there too.
        position_padding = self.padding_idx if config.position_scheme == "after_padding" else None
        absolute = config.position_scheme not in RELATIVE_SCHEMES or config.position_biased_input
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width, padding_idx=position_padding) \
            if absolute else None
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width) if config.type_vocab_size else None
        self.project_first = config.embedding_projection == "before_norm"  # DeBERTa's embed_proj: LayerNorm(hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden_size if self.project_first else width,
                                      eps=config.layer_norm_eps) if config.embedding_norm else None
        self.dropout = Dropout(config.hidden_dropout_prob)  # honours bertode.layers.dropout.split_invariant
        self.project = nn.Linear(width, config.hidden_size, bias=not self.project_first) \
            if projects_embeddings(config) else None
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                             persistent=False)

    def _positions(self, input_ids, seq_len: int, past: int) -> torch.Tensor:
        """Position ids of these tokens, which follow ``past`` cached ones (HF's ``cache_length`` rule)."""
        if self.position_scheme != "after_padding":  # absolute, or DeBERTa's position_biased_input
            return self.position_ids[:, past:past + seq_len]
        if input_ids is None:  # RoBERTa's rule without ids: every token is a real one
            return self.position_ids[:, past + 1:past + seq_len + 1] + self.padding_idx
        real = input_ids.ne(self.padding_idx).long()
        return (torch.cumsum(real, dim=1) + past) * real + self.padding_idx

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, past: int = 0):
        """``past``: positions already in a key/value cache, which these tokens follow."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_len = inputs_embeds.shape[1]
        if position_ids is None and self.position_embeddings is not None:
            position_ids = self._positions(input_ids, seq_len, past)
        embeddings = inputs_embeds
        if self.token_type_embeddings is not None:  # HF's order of additions: the sums are bit-equal
            if token_type_ids is None:
                token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.project_first:
            embeddings = self.project(embeddings)
        if self.LayerNorm is not None:
            embeddings = self.LayerNorm(embeddings)
        embeddings = self.dropout(embeddings)
        return self.project(embeddings) if self.project is not None and not self.project_first else embeddings


class BertODEPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.pooler_hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class _Transform(nn.Module):
    def __init__(self, config):
        super().__init__()
        width = embedding_width(config)
        self.dense = nn.Linear(config.hidden_size, width)
        self.transform_act_fn = ACT2FN[config.head_hidden_act or config.hidden_act]
        self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class _Predictions(nn.Module):
    def __init__(self, config):
        super().__init__()
        linear = config.lm_head_type == "linear"  # GPT-2: logits = h E^T
        self.transform = None if linear else _Transform(config)
        self.decoder = nn.Linear(embedding_width(config), config.vocab_size, bias=not linear)  # bias tied to `bias`
        self.bias = None if linear else nn.Parameter(torch.zeros(config.vocab_size))
        self.loss_kernel: str | None = None  # the kernel of the latest `scored` call: "chunked" or "liger"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states) if self.transform is not None else hidden_states)

    @torch.compiler.disable  # as `modeling.scored_rows`: n rows vary per batch, the chunk loop in Python
    def scored(self, hidden_states: torch.Tensor, labels: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse prediction: ``(loss, logits)`` of the rows ``hidden_states`` (n, hidden) against ``labels`` (n,),
        the decoder fused with its cross-entropy (fp32; ``reduction`` sum or mean); ``logits`` (n, vocab) are
        detached (the loss never held them in fp32 for the whole batch)."""
        states = self.transform(hidden_states) if self.transform is not None else hidden_states
        loss, logits, self.loss_kernel = linear_cross_entropy(states, self.decoder.weight, self.decoder.bias, labels,
                                                              reduction)
        return loss, logits


class BertODEMLMHead(nn.Module):
    """``cls.predictions``: logits over the vocabulary for every position."""

    def __init__(self, config):
        super().__init__()
        adaptive = config.lm_head_type == "adaptive"  # Transformer-XL's softmax: `adaptive.py`
        self.predictions = AdaptivePredictions(config) if adaptive else _Predictions(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)
