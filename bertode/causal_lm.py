"""`BertODEForCausalLM`: next-token prediction over causal attention, with `generate()`.

BERT's LM head (`BertLMHeadModel`'s, tied to the word embeddings) on a `BertODEModel`
whose attention is causal (``config.is_decoder=True``, `sublayers.sdpa_mask`), so the
ODE, block and DEQ modes all predict the next token from the tokens up to it. The loss
of position i is the cross-entropy of token i + 1 (labels are shifted inside, as in
transformers' causal-LM loss; the last position has no target).

Key/value caches (`layers.kv_cache`): transformers' ``cache`` (a `DynamicCache`; generation
makes one) holds the keys and values of every attention evaluation of the past tokens, so
``generate()`` (greedy, sampling, beams: the cache is reordered) runs the new token only.
Exact where every call makes the same evaluations: discrete, fixed-step solvers and blocks,
looped cores; a DEQ to its solve's tolerance. A model whose solver is adaptive generates
without a cache (``generation_config.use_cache`` is False) and refuses ``use_cache=True`` in
one line. With ``add_cross_attention`` the decoder attends to an encoder's states
(`transformers.EncoderDecoderModel`).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration import BertODEConfig
from .modeling import LanguageModelHead
from .layers import kv_cache
from .layers.outputs import BertODECausalLMOutput

logger = logging.get_logger(__name__)


class BertODEForCausalLM(LanguageModelHead, GenerationMixin):
    """``labels`` (batch, seq): the tokens themselves (shifted inside), -100 where ignored; or, as
    transformers' causal LMs, ``shift_labels`` as well: the targets already shifted (position i's is
    ``shift_labels[i]``), used instead of shifting ``labels``. ``logits_to_keep``: the logits of only
    the last k positions (an int; 0: all) or of the given positions (a 1-D tensor), as HF's; the
    encoder still runs on every position given. ``cache`` / ``use_cache``: as HF's BERT decoder (no cache
    with ``labels``); ``encoder_hidden_states`` / ``encoder_attention_mask``: the cross-attention's memory. ``mems``: with
    ``config.mem_len`` > 0, the previous segment's output ``mems`` (`layers.segment_memory`)."""

    output_class = BertODECausalLMOutput
    predicts_next_token = True  # position i predicts token i + 1

    def __init__(self, config: BertODEConfig):
        if not config.is_decoder:  # as HF's BertLMHeadModel: a warning, and the attention stays bidirectional
            logger.warning("If you want to use `BertODEForCausalLM` as a standalone, add `is_decoder=True.` "
                           "(without it every position attends to the tokens after it)")
        super().__init__(config)
        # generation's default: the cache wherever it is exact (module docstring)
        self.generation_config.use_cache = bool(config.use_cache) and kv_cache.config_refusal(config) is None

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers 5's name, with its warning
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                cache=None, use_cache=None, output_hidden_states=None, output_attentions=None,
                output_trajectory=False, return_dict=None, num_items_in_batch=None, shift_labels=None,
                logits_to_keep: int | torch.Tensor = 0, penalty_share=None, past_key_values=None, mems=None,
                **kwargs):
        check_logits_to_keep(logits_to_keep, (input_ids if input_ids is not None else inputs_embeds).shape[1], labels)
        if labels is not None:  # as HF's BertLMHeadModel: training scores every position, no cache
            use_cache = False
        return self._predict(input_ids, inputs_embeds, labels, return_dict, num_items_in_batch,
                             shift_labels=shift_labels, logits_to_keep=logits_to_keep, penalty_share=penalty_share,
                             attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
                             encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                             cache=cache if cache is not None else past_key_values, use_cache=use_cache,
                             output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                             output_trajectory=output_trajectory, **({"mems": mems} if mems is not None else {}))

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, inputs_embeds=None, cache=None,
                                      **kwargs):
        """transformers' default (every model kwarg forwarded: ``logits_to_keep``, ``output_attentions``,
        ``token_type_ids``, generation's ``position_ids``, ...). Without a cache (``use_cache=False``, or an
        adaptive solver), the whole prefix at every step: ``next_sequence_length`` (the new tokens only) is
        ignored, and after ``generate(inputs_embeds=...)`` every step embeds the prompt's embeddings followed by
        the generated tokens' (HF uses the embeddings at the first step only, the cache holding them after)."""
        if cache is not None:
            return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length,
                                                         cache=cache, inputs_embeds=inputs_embeds, **kwargs)
        inputs = super().prepare_inputs_for_generation(input_ids, next_sequence_length=None, **kwargs)
        if inputs_embeds is not None:
            # input_ids: generate's tokens (empty at first), after the prompt's ids if it was given them too;
            # the mask and generation's position ids span the whole sequence
            spans = [kwargs[name] for name in ("attention_mask", "position_ids") if kwargs.get(name) is not None]
            generated = spans[0].shape[-1] - inputs_embeds.shape[1] if spans else input_ids.shape[1]
            tokens = input_ids[:, input_ids.shape[1] - generated:]
            inputs["input_ids"] = None
            inputs["inputs_embeds"] = torch.cat([inputs_embeds, self.get_input_embeddings()(tokens)], dim=1)
            for name in ("position_ids", "token_type_ids"):  # the default cut them to input_ids' length
                if kwargs.get(name) is not None:
                    inputs[name] = kwargs[name]
        return inputs


def check_logits_to_keep(logits_to_keep, seq_len: int, labels) -> None:
    """One line for a ``logits_to_keep`` that keeps positions the sequence does not have, or that
    would leave a loss without its positions' logits."""
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, torch.Tensor)):
        raise ValueError(f"logits_to_keep={logits_to_keep!r} is invalid; allowed: an int in [0, {seq_len}] "
                         "or a 1-D tensor of positions")
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.ndim != 1:
            raise ValueError(f"logits_to_keep of shape {tuple(logits_to_keep.shape)} is invalid; allowed: an int "
                             f"in [0, {seq_len}] or a 1-D tensor of positions")
    elif not 0 <= logits_to_keep <= seq_len:
        raise ValueError(f"logits_to_keep={logits_to_keep} is invalid for a sequence of {seq_len} positions; "
                         f"allowed: an int in [0, {seq_len}] (0: every position) or a 1-D tensor of positions")
    if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep in (0, seq_len)):
        raise ValueError(f"logits_to_keep={logits_to_keep!r} with labels is invalid; allowed: 0 or {seq_len} "
                         "(the loss scores every position)")


AutoModelForCausalLM.register(BertODEConfig, BertODEForCausalLM, exist_ok=True)
