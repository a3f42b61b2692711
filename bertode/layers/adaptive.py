"""Transformer-XL's adaptive input embedding and adaptive softmax (``lm_head_type="adaptive"``).

The vocabulary is cut at ``adaptive_cutoffs`` c_1 < ... < c_n into clusters [0, c_1), [c_1, c_2), ...,
[c_n, V): ids in frequency order, so the head cluster holds the frequent words. Cluster j has width
d_j = E // div_value**j (E: the embedding width, which must be ``hidden_size``).

* `AdaptiveEmbedding`: cluster j embeds its ids at width d_j and projects them to E (cluster 0: no
  projection), as Transformer-XL's ``AdaptiveEmbedding`` (without its sqrt(E) scale: BERT's
  embedding LayerNorm follows).
* `AdaptivePredictions`: `torch.nn.AdaptiveLogSoftmaxWithLoss` itself (its ``forward`` is the loss,
  its ``log_prob`` the logits), with head bias, and with its linear maps laid out so that they tie
  to the embedding where Transformer-XL ties them (``tie_weight`` and ``tie_projs`` for every tail
  cluster; `tied_weights_keys`): the head's rows for the head words are cluster 0's embedding
  (``shortlist``, with a bias; the cluster logits, ``clusters``, are the softmax's own), tail
  cluster i's output matrix is embedding cluster i + 1, and its projection E -> d_{i+1} is the
  embedding's projection d_{i+1} -> E, transposed. torch's module has no tail bias; neither has this.

``logits`` of this head are log-probabilities (``log_prob``): softmax of them is the model's
distribution, so generation, ``logits_to_keep`` and a cross-entropy of them work as with logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDINGS = "bert.embeddings.word_embeddings"
PREDICTIONS = "cls.predictions"


def cluster_widths(config) -> list[int]:
    """d_j of every cluster j (torch's rule: ``int(E // div_value**j)``)."""
    width = config.hidden_size  # the embedding width (`validation.check_adaptive`)
    return [int(width // (config.adaptive_div_value ** j)) for j in range(len(config.adaptive_cutoffs) + 1)]


def cluster_bounds(config) -> list[tuple[int, int]]:
    edges = [0, *config.adaptive_cutoffs, config.vocab_size]
    return list(zip(edges, edges[1:]))


class AdaptiveEmbedding(nn.Module):
    """Token ids -> (..., E) vectors: each id embedded by its cluster's table and projected to E."""

    def __init__(self, config):
        super().__init__()
        pad = config.pad_token_id
        self.bounds = cluster_bounds(config)
        widths = cluster_widths(config)
        self.clusters = nn.ModuleList(
            nn.Embedding(high - low, width, padding_idx=pad - low if pad is not None and low <= pad < high else None)
            for (low, high), width in zip(self.bounds, widths))
        self.projections = nn.ModuleList(nn.Linear(width, widths[0], bias=False) for width in widths[1:])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Every cluster looks up every id (clamped into its range) and keeps its own ids' rows: no host
        # sync for a data-dependent count; the others' rows get no gradient through `where`.
        output = None
        for j, (low, high) in enumerate(self.bounds):
            inside = (input_ids >= low) & (input_ids < high)
            vectors = self.clusters[j]((input_ids - low).clamp(0, high - low - 1))
            if j:
                vectors = self.projections[j - 1](vectors)
            output = vectors * inside.unsqueeze(-1) if output is None else torch.where(inside.unsqueeze(-1), vectors, output)
        return output


class _Head(nn.Module):
    """The head cluster's logits: the head words' (``shortlist``, tied to embedding cluster 0) and
    one per tail cluster (``clusters``), as torch's ``head`` Linear with those rows stacked."""

    def __init__(self, width: int, shortlist: int, clusters: int):
        super().__init__()
        self.shortlist = nn.Linear(width, shortlist)
        self.clusters = nn.Linear(width, clusters)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, torch.cat([self.shortlist.weight, self.clusters.weight]),
                        torch.cat([self.shortlist.bias, self.clusters.bias]))


class _TransposedProjection(nn.Linear):
    """E -> d: the embedding's projection d -> E (weight (E, d)) applied transposed, so the two tie."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight.t())


def _fp32(hidden: torch.Tensor):
    """Autocast off: torch's module writes the clusters' log-probabilities into a buffer of its input's dtype,
    so the whole head runs in fp32 (small by design: the head cluster, and each row's own tail cluster)."""
    return torch.autocast(hidden.device.type, enabled=False)


class AdaptivePredictions(nn.AdaptiveLogSoftmaxWithLoss):
    """``cls.predictions`` of ``lm_head_type="adaptive"``: `_Predictions`' interface (``forward``: logits,
    `scored`: sparse prediction's loss and logits) over torch's adaptive softmax (module docstring)."""

    def __init__(self, config):
        width = config.hidden_size
        super().__init__(config.hidden_size, config.vocab_size, list(config.adaptive_cutoffs),
                         div_value=float(config.adaptive_div_value), head_bias=True)
        self.head = _Head(width, self.shortlist_size, self.n_clusters)
        for cluster, tail in zip(cluster_widths(config)[1:], self.tail):
            tail[0] = _TransposedProjection(cluster, width, bias=False)
        self.bias = None  # no decoder bias (`modeling.TiedMLMDecoder`)
        self.loss_kernel: str | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (..., vocab) in fp32: the logits of this head."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
        with _fp32(flat):
            return self.log_prob(flat).reshape(*hidden_states.shape[:-1], self.n_classes)

    @torch.compiler.disable  # torch's loss routes rows by cluster: data-dependent shapes
    def scored(self, hidden_states: torch.Tensor, labels: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse prediction: ``(loss, logits)`` of the rows ``hidden_states`` (n, hidden) against ``labels`` (n,),
        none of them -100: torch's adaptive loss (``reduction`` sum or mean of the targets' negative
        log-probabilities, fp32), and the rows' log-probabilities (n, vocab), detached."""
        hidden = hidden_states.float()
        with _fp32(hidden):
            target_log_probs = super().forward(hidden, labels.to(hidden.device)).output
            loss = -target_log_probs.sum() if reduction == "sum" else -target_log_probs.mean()
            with torch.no_grad():
                logits = self.log_prob(hidden)
        self.loss_kernel = "adaptive"
        return loss, logits


def tied_weights_keys(config) -> dict[str, str]:
    """HF's ``{target: source}`` ties of the adaptive head to the adaptive embedding (module docstring)."""
    keys = {f"{PREDICTIONS}.head.shortlist.weight": f"{EMBEDDINGS}.clusters.0.weight"}
    for i in range(len(config.adaptive_cutoffs)):
        keys[f"{PREDICTIONS}.tail.{i}.0.weight"] = f"{EMBEDDINGS}.projections.{i}.weight"
        keys[f"{PREDICTIONS}.tail.{i}.1.weight"] = f"{EMBEDDINGS}.clusters.{i + 1}.weight"
    return keys
