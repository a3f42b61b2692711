"""`BertODEForCausalLM`: next-token prediction over causal attention, with `generate()`.

BERT's LM head (`BertLMHeadModel`'s, tied to the word embeddings) on a `BertODEModel`
whose attention is causal (``config.is_decoder=True``, `sublayers.sdpa_mask`), so the
ODE, block and DEQ modes all predict the next token from the tokens up to it. The loss
of position i is the cross-entropy of token i + 1 (labels are shifted inside, as in
transformers' causal-LM loss; the last position has no target).

No key/value cache: an ODE layer re-evaluates attention at every solver stage on that
stage's state, so the keys and values of earlier positions are not one fixed tensor per
layer. `generate()` (transformers' `GenerationMixin`: greedy, sampling, beams) therefore
re-runs the whole prefix for every new token; its outputs are exact, each step costs a
full forward.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationMixin

from .configuration import BertODEConfig
from .embeddings import BertODEMLMHead
from .modeling import BertODEModel, BertODEPreTrainedModel, TiedMLMDecoder
from .outputs import BertODECausalLMOutput


class BertODEForCausalLM(TiedMLMDecoder, BertODEPreTrainedModel, GenerationMixin):
    def __init__(self, config: BertODEConfig):
        if not config.is_decoder:
            raise ValueError("BertODEForCausalLM needs BertODEConfig.is_decoder=True (causal attention); "
                             "allowed: a decoder config, or BertODEForMaskedLM for a bidirectional model")
        super().__init__(config)
        self.bert = BertODEModel(config, add_pooling_layer=False)
        self.cls = BertODEMLMHead(config)
        self.post_init()
        self.generation_config.use_cache = False  # module docstring: no key/value cache

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                output_trajectory=False, return_dict=None, num_items_in_batch=None, **kwargs):
        """``labels`` (batch, seq): the tokens themselves (shifted here), -100 where ignored.
        Generation's cache arguments (``cache``, ``use_cache``) are accepted and unused."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs, skipped = self._encode(input_ids, inputs_embeds, attention_mask=attention_mask,
                                        token_type_ids=token_type_ids, position_ids=position_ids,
                                        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                                        output_trajectory=output_trajectory)
        if skipped is not None:
            shape = (*(input_ids if input_ids is not None else inputs_embeds).shape[:2], self.config.vocab_size)
            loss, logits = self._zero_loss(), torch.zeros(shape, device=self.device)
            return BertODECausalLMOutput(loss=loss, logits=logits) if return_dict else (loss, logits)
        logits = self.cls(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            flat_labels = labels[:, 1:].reshape(-1).to(logits.device)  # position i predicts token i + 1
            loss = self._token_loss(logits[:, :-1].reshape(-1, self.config.vocab_size), flat_labels, num_items_in_batch)
        if not return_dict:
            rest = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return BertODECausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions, solver_stats=outputs.solver_stats,
                                     trajectory=outputs.trajectory)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The whole prefix at every step (no cache), with generation's position ids (counted
        over real tokens, so a left-padded row is numbered as it would be unpadded)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": kwargs.get("position_ids")}


AutoModelForCausalLM.register(BertODEConfig, BertODEForCausalLM, exist_ok=True)
