"""Model outputs: transformers' dataclasses plus the solves' statistics of the forward (the
base model's also the encoder's penalty term and skipped flag, which its heads consume).

``solver_stats`` is the forward's `SolverStats` (a read-only mapping onto its summary;
backward counts arrive once the backward has run). ``trajectory`` (with
``output_trajectory=True``) holds one dict per solve: ``name``, ``times``, ``states`` and
``outputs`` (`bertode.solve.observe`); ``attentions`` (``output_attentions``) one tensor
per layer. It is listed in the config's
``keys_to_ignore_at_inference``, so `transformers.Trainer` does not gather it as a
prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    NextSentencePredictorOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

from ..solve.stats import SolverStats


@dataclass
class BertODEModelOutput(BaseModelOutputWithPoolingAndCrossAttentions):
    """The base model's output; what its encoder returned beside the states (`encoder.EncoderOutput`) rides along
    for the heads: ``penalty``, the loss's weighted penalty term (None: none), and ``skipped`` (True: the encoder
    skipped this batch, ``deq_on_nonfinite="skip"``; None otherwise)."""

    solver_stats: SolverStats | None = None
    trajectory: tuple | None = None
    penalty: torch.Tensor | None = None
    skipped: bool | None = None
    mems: tuple | None = None


@dataclass
class BertODEMaskedLMOutput(MaskedLMOutput):
    solver_stats: SolverStats | None = None
    trajectory: tuple | None = None


@dataclass
class BertODECausalLMOutput(CausalLMOutputWithCrossAttentions):
    solver_stats: SolverStats | None = None
    trajectory: tuple | None = None
    mems: tuple | None = None  # a segment memory's states for the next segment (`segment_memory`)


@dataclass
class BertODESequenceClassifierOutput(SequenceClassifierOutput):
    solver_stats: SolverStats | None = None
    trajectory: tuple | None = None


@dataclass
class BertODEForPreTrainingOutput(BertForPreTrainingOutput):
    solver_stats: SolverStats | None = None
    trajectory: tuple | None = None


@dataclass
class BertODENextSentencePredictorOutput(NextSentencePredictorOutput):
    solver_stats: SolverStats | None = None
    trajectory: tuple | None = None


@dataclass
class BertODETokenClassifierOutput(TokenClassifierOutput):
    solver_stats: SolverStats | None = None
    trajectory: tuple | None = None


@dataclass
class BertODEQuestionAnsweringOutput(QuestionAnsweringModelOutput):
    solver_stats: SolverStats | None = None
    trajectory: tuple | None = None


@dataclass
class BertODEMultipleChoiceModelOutput(MultipleChoiceModelOutput):
    solver_stats: SolverStats | None = None
    trajectory: tuple | None = None
