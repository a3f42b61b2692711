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

from transformers import AutoModelForCausalLM, GenerationMixin

from .configuration import BertODEConfig
from .modeling import LanguageModelHead
from .layers.outputs import BertODECausalLMOutput


class BertODEForCausalLM(LanguageModelHead, GenerationMixin):
    """``labels`` (batch, seq): the tokens themselves (shifted inside), -100 where ignored.
    Generation's cache arguments (``cache``, ``use_cache``) are accepted and unused."""

    output_class = BertODECausalLMOutput
    shift_labels = True  # position i predicts token i + 1

    def __init__(self, config: BertODEConfig):
        if not config.is_decoder:
            raise ValueError("BertODEForCausalLM needs BertODEConfig.is_decoder=True (causal attention); "
                             "allowed: a decoder config, or BertODEForMaskedLM for a bidirectional model")
        super().__init__(config)
        self.generation_config.use_cache = False  # module docstring: no key/value cache

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The whole prefix at every step (no cache), with generation's position ids (counted
        over real tokens, so a left-padded row is numbered as it would be unpadded)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": kwargs.get("position_ids")}


AutoModelForCausalLM.register(BertODEConfig, BertODEForCausalLM, exist_ok=True)
