"""BERT's task heads on the ODE/DEQ encoder, with HF BERT's layouts and loss conventions.

`BertODEForSequenceClassification`, `BertODEForPreTraining` (MLM + next sentence),
`BertODEForNextSentencePrediction`, `BertODEForTokenClassification`,
`BertODEForQuestionAnswering` and `BertODEForMultipleChoice` (`BertODEForMaskedLM` is in
`modeling.py`). Parameter names are HF BERT's (``cls.seq_relationship``, ``classifier``,
``qa_outputs``), so `from_bert` copies them one to one. A head adds a projection and a
loss, nothing else: the encoder's penalty and a skipped batch (a zero loss, zero logits)
are `BertODEPreTrainedModel._result`'s, the same for every head. With ``config.sparse_prediction``,
token classification and pre-training's MLM score only the labelled positions while training
(`modeling.scored_rows`; their logits are then those rows').
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import (
    AutoModelForMultipleChoice,
    AutoModelForNextSentencePrediction,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .layers import outputs as out
from .configuration import BertODEConfig
from .layers.dropout import Dropout
from .layers.embeddings import _Predictions
from .modeling import BertODEModel, BertODEPreTrainedModel, TiedMLMDecoder, scored_rows


def _classifier_dropout(config) -> Dropout:
    return Dropout(config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob)


class _Head(BertODEPreTrainedModel):
    """A base model and a head: `_run` encodes, `_result` packs the output dataclass (or HF's
    tuple) with the solves' statistics (`modeling.py`)."""

    pooled = True  # whether the head reads the pooler output

    def __init__(self, config: BertODEConfig):
        super().__init__(config)
        self.bert = BertODEModel(config, add_pooling_layer=self.pooled)

    def _run(self, input_ids, inputs_embeds, output_attentions=None, output_trajectory=False, **kwargs):
        return self._encode(input_ids, inputs_embeds, output_attentions=output_attentions,
                            output_trajectory=output_trajectory, **kwargs)

    @staticmethod
    def _return_dict(config, return_dict):
        return return_dict if return_dict is not None else config.return_dict


class BertODEForSequenceClassification(_Head):
    accepts_loss_kwargs = False  # the loss is a mean: Trainer divides it over gradient accumulation

    def __init__(self, config: BertODEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None,
                output_attentions=None, output_trajectory=False, return_dict=None, **kwargs):
        return_dict = self._return_dict(self.config, return_dict)
        outputs = self._run(input_ids, inputs_embeds, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions, output_trajectory=output_trajectory)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = self._loss(logits, labels) if labels is not None else None
        return self._result(out.BertODESequenceClassifierOutput, return_dict, outputs, loss, logits=logits)

    def _loss(self, logits, labels):
        """HF BERT's rule: regression for one label, single- or multi-label classification otherwise."""
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return MSELoss()(logits.squeeze(-1).float(), labels.float())
            return MSELoss()(logits.float(), labels.float())
        if self.config.problem_type == "single_label_classification":
            return CrossEntropyLoss()(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return BCEWithLogitsLoss()(logits.float(), labels.float())


class _PreTrainingHeads(nn.Module):
    def __init__(self, config, masked_lm: bool):
        super().__init__()
        if masked_lm:
            self.predictions = _Predictions(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertODEForPreTraining(TiedMLMDecoder, _Head):
    """BERT's pre-training objective: masked LM plus next-sentence prediction; the loss is
    their sum when both ``labels`` and ``next_sentence_label`` are given."""

    accepts_loss_kwargs = False

    def __init__(self, config: BertODEConfig):
        super().__init__(config)
        self.cls = _PreTrainingHeads(config, masked_lm=True)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, next_sentence_label=None, output_hidden_states=None,
                output_attentions=None, output_trajectory=False, return_dict=None, **kwargs):
        return_dict = self._return_dict(self.config, return_dict)
        outputs = self._run(input_ids, inputs_embeds, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions, output_trajectory=output_trajectory)
        relationship = self.cls.seq_relationship(outputs.pooler_output)
        if self._sparse(labels):  # (n_targets, vocab) logits, detached; the loss without the batch's fp32 logits
            masked_lm, prediction = self.cls.predictions.scored(*scored_rows(outputs.last_hidden_state, labels), "mean")
        else:
            prediction = self.cls.predictions(outputs.last_hidden_state)
            masked_lm = None
            if labels is not None and next_sentence_label is not None:
                masked_lm = CrossEntropyLoss()(prediction.view(-1, self.config.vocab_size).float(), labels.view(-1))
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = masked_lm + CrossEntropyLoss()(relationship.view(-1, 2).float(), next_sentence_label.view(-1))
        return self._result(out.BertODEForPreTrainingOutput, return_dict, outputs, loss,
                            prediction_logits=prediction, seq_relationship_logits=relationship)


class BertODEForNextSentencePrediction(_Head):
    accepts_loss_kwargs = False

    def __init__(self, config: BertODEConfig):
        super().__init__(config)
        self.cls = _PreTrainingHeads(config, masked_lm=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, output_hidden_states=None,
                output_attentions=None, output_trajectory=False, return_dict=None, **kwargs):
        return_dict = self._return_dict(self.config, return_dict)
        outputs = self._run(input_ids, inputs_embeds, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions, output_trajectory=output_trajectory)
        logits = self.cls.seq_relationship(outputs.pooler_output)
        loss = CrossEntropyLoss()(logits.view(-1, 2).float(), labels.view(-1)) if labels is not None else None
        return self._result(out.BertODENextSentencePredictorOutput, return_dict, outputs, loss, logits=logits)


class BertODEForTokenClassification(_Head):
    accepts_loss_kwargs = False
    pooled = False

    def __init__(self, config: BertODEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, output_hidden_states=None,
                output_attentions=None, output_trajectory=False, return_dict=None, **kwargs):
        return_dict = self._return_dict(self.config, return_dict)
        outputs = self._run(input_ids, inputs_embeds, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions, output_trajectory=output_trajectory)
        hidden = self.dropout(outputs.last_hidden_state)  # the dense path's masks, also when sparse
        if self._sparse(labels):  # (n_targets, num_labels) logits
            hidden, labels = scored_rows(hidden, labels)
        logits = self.classifier(hidden)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return self._result(out.BertODETokenClassifierOutput, return_dict, outputs, loss, logits=logits)


class BertODEForQuestionAnswering(_Head):
    """Extractive QA: start and end logits per token; the loss is the mean of the start and
    end cross-entropies, positions outside the sequence ignored (HF's rule)."""

    accepts_loss_kwargs = False
    pooled = False

    def __init__(self, config: BertODEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_hidden_states=None,
                output_attentions=None, output_trajectory=False, return_dict=None, **kwargs):
        return_dict = self._return_dict(self.config, return_dict)
        outputs = self._run(input_ids, inputs_embeds, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions, output_trajectory=output_trajectory)
        start, end = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start.size(1)
            criterion = CrossEntropyLoss(ignore_index=ignored)
            loss = (criterion(start.float(), start_positions.view(-1).clamp(0, ignored))
                    + criterion(end.float(), end_positions.view(-1).clamp(0, ignored))) / 2
        return self._result(out.BertODEQuestionAnsweringOutput, return_dict, outputs, loss, start_logits=start,
                            end_logits=end)


class BertODEForMultipleChoice(_Head):
    """Inputs of shape (batch, choices, seq); one logit per choice."""

    accepts_loss_kwargs = False

    def __init__(self, config: BertODEConfig):
        super().__init__(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, output_hidden_states=None,
                output_attentions=None, output_trajectory=False, return_dict=None, **kwargs):
        return_dict = self._return_dict(self.config, return_dict)
        choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]

        def flat(x):
            return None if x is None else x.reshape(-1, *x.shape[2:])

        outputs = self._run(flat(input_ids), flat(inputs_embeds), attention_mask=flat(attention_mask),
                            token_type_ids=flat(token_type_ids), position_ids=flat(position_ids),
                            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                            output_trajectory=output_trajectory)
        logits = self.classifier(self.dropout(outputs.pooler_output)).view(-1, choices)
        loss = CrossEntropyLoss()(logits.float(), labels.view(-1)) if labels is not None else None
        return self._result(out.BertODEMultipleChoiceModelOutput, return_dict, outputs, loss, logits=logits)


HEADS = {
    AutoModelForSequenceClassification: BertODEForSequenceClassification,
    AutoModelForPreTraining: BertODEForPreTraining,
    AutoModelForNextSentencePrediction: BertODEForNextSentencePrediction,
    AutoModelForTokenClassification: BertODEForTokenClassification,
    AutoModelForQuestionAnswering: BertODEForQuestionAnswering,
    AutoModelForMultipleChoice: BertODEForMultipleChoice,
}
for _auto, _model in HEADS.items():
    _auto.register(BertODEConfig, _model, exist_ok=True)
