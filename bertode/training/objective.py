"""The language-model objective of `bertode.train` and `bertode.evaluate` (``objective=``):
what a packed row becomes as (inputs, labels), how logits line up with labels, and the
head that trains it.

* ``mlm`` (default): BERT's masked-language model. ``data.mlm_probability`` of the tokens
  are corrupted (`corpus.mask_tokens`); the chosen tokens are the targets.
* ``clm``: next-token prediction over causal attention (``is_decoder=True``,
  `BertODEForCausalLM`); rows go in unchanged.

The convention for each packed row ``[CLS] t_1 ... t_{T-2} [SEP]`` under ``clm``: the
targets are exactly the text tokens t_1 ... t_{T-2}. t_1 is predicted from [CLS] alone
(a packed row starts mid-document and sees nothing before it); [CLS] and [SEP] are
never targets. The unigram baseline (`corpus.unigram_cross_entropy`) scores the same
tokens, and perplexity is exp of the mean cross-entropy per target token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..causal_lm import BertODEForCausalLM
from ..modeling import BertODEForMaskedLM
from .corpus import mask_tokens

OBJECTIVES = ("mlm", "clm")
HEADS = {"mlm": BertODEForMaskedLM, "clm": BertODEForCausalLM}


def check_objective(value) -> str:
    if value not in OBJECTIVES:
        raise ValueError(f"objective={value!r} is invalid; allowed: {', '.join(map(repr, OBJECTIVES))}")
    return value


@dataclass(frozen=True)
class Objective:
    name: str
    tokenizer: object
    mlm_probability: float = 0.15

    @property
    def causal(self) -> bool:
        return self.name == "clm"

    @property
    def model_class(self):
        return HEADS[self.name]

    @property
    def label(self) -> str:
        return self.name.upper()

    def make_batch(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of packed rows; labels are -100 where nothing is predicted (for
        ``clm`` by position: the first and last token of every row, [CLS] and [SEP])."""
        if not self.causal:
            return mask_tokens(rows, self.tokenizer, self.mlm_probability, generator)
        labels = rows.clone()
        labels[:, 0] = labels[:, -1] = -100
        return rows.clone(), labels

    def aligned(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the labels they predict: position i's against token i + 1 under ``clm``
        (the shift `BertODEForCausalLM` applies to its own loss)."""
        return (logits[:, :-1], labels[:, 1:]) if self.causal else (logits, labels)

    def targets(self, labels: torch.Tensor) -> int:
        """How many tokens ``labels`` asks to predict."""
        return int(((labels[:, 1:] if self.causal else labels) != -100).sum())
