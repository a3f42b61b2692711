"""ODE-BERT models as `transformers` `PreTrainedModel`s, registered with the Auto classes.

`BertODEModel` is BERT's embeddings and pooler (reused from `transformers`) around the
`BertODEEncoder`; the heads are BERT's. Outputs are transformers' output dataclasses,
and ``model.solver_stats()`` reports the latest forward's (and backward's) solves.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.utils import logging
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLMPredictionHead, BertOnlyMLMHead, BertPooler

from .configuration import BertODEConfig
from .deq import BertDEQEncoder
from .deq_solvers import DEQSolveError
from .encoder import BertODEEncoder
from .sublayers import sdpa_mask

logger = logging.get_logger(__name__)


class BertODEPreTrainedModel(PreTrainedModel):
    config_class = BertODEConfig
    base_model_prefix = "bert"
    _supports_sdpa = True
    _no_split_modules = ["BertEmbeddings", "BertODELayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and getattr(module, "_bertode_zero_init", False):
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and getattr(module, "_bertode_identity_init", False):
            init.eye_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)

    def solver_stats(self) -> dict:
        """ODE: NFE (forward and backward), accepted/rejected steps, per site and in total.
        DEQ: iterations, residuals, converged fraction, backward iterations, counters."""
        return self.base_model.encoder.solver_stats()

    def _regularised(self, loss):
        """Add the DEQ Jacobian penalty of the latest forward, when one was computed."""
        jac_loss = getattr(self.base_model.encoder, "jac_loss", None)
        if loss is None or jac_loss is None:
            return loss
        return loss + self.config.jac_reg_weight * jac_loss

    def _skip_batch(self, error: DEQSolveError, logits_shape, device):
        """deq_on_nonfinite='skip': a zero loss with no path to any parameter, counted."""
        if self.config.deq_on_nonfinite != "skip":
            raise error
        self.base_model.encoder.skipped_batches += 1
        logger.warning("skipping a batch: %s", error)
        return torch.zeros((), device=device, requires_grad=True), torch.zeros(logits_shape, device=device)


class BertODEModel(BertODEPreTrainedModel):
    def __init__(self, config: BertODEConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertDEQEncoder(config) if config.mode == "deq" else BertODEEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("BertODEModel.forward needs exactly one of input_ids or inputs_embeds")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = self.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        sequence_output, states = self.encoder(hidden, sdpa_mask(attention_mask), output_hidden_states)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        if not return_dict:
            return tuple(v for v in (sequence_output, pooled, states) if v is not None)
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output, pooler_output=pooled, hidden_states=states
        )


class BertODEForMaskedLM(BertODEPreTrainedModel):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BertODEConfig):
        super().__init__(config)
        self.bert = BertODEModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        try:
            outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                position_ids=position_ids, inputs_embeds=inputs_embeds,
                                output_hidden_states=output_hidden_states, return_dict=True)
        except DEQSolveError as error:
            shape = (*(input_ids if input_ids is not None else inputs_embeds).shape[:2], self.config.vocab_size)
            loss, logits = self._skip_batch(error, shape, self.device)
            return MaskedLMOutput(loss=loss, logits=logits) if return_dict else (loss, logits)
        logits = self.cls(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.config.vocab_size).float(), labels.view(-1))
            loss = self._regularised(loss)
        if not return_dict:
            rest = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class BertODEForSequenceClassification(BertODEPreTrainedModel):
    def __init__(self, config: BertODEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertODEModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        try:
            outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                position_ids=position_ids, inputs_embeds=inputs_embeds,
                                output_hidden_states=output_hidden_states, return_dict=True)
        except DEQSolveError as error:
            shape = ((input_ids if input_ids is not None else inputs_embeds).shape[0], self.num_labels)
            loss, logits = self._skip_batch(error, shape, self.device)
            return SequenceClassifierOutput(loss=loss, logits=logits) if return_dict else (loss, logits)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            loss = self._regularised(self._loss(logits, labels))
        if not return_dict:
            rest = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

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
            return MSELoss()(logits.squeeze(-1).float(), labels.float()) if self.num_labels == 1 else MSELoss()(logits.float(), labels.float())
        if self.config.problem_type == "single_label_classification":
            return CrossEntropyLoss()(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return BCEWithLogitsLoss()(logits.float(), labels.float())


AutoConfig.register("bertode", BertODEConfig, exist_ok=True)
AutoModel.register(BertODEConfig, BertODEModel, exist_ok=True)
AutoModelForMaskedLM.register(BertODEConfig, BertODEForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(BertODEConfig, BertODEForSequenceClassification, exist_ok=True)
