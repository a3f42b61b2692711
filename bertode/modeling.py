"""ODE-BERT models as `transformers` `PreTrainedModel`s, registered with the Auto classes.

`BertODEModel` is BERT's embeddings and pooler around the `BertODEEncoder` or `BertDEQEncoder` (and a final
LayerNorm for pre-LN layers); the heads are BERT's. Outputs are transformers' output dataclasses with
``solver_stats`` (`outputs.py`); ``model.solver_stats()`` reports the latest solves.

The model owns its training semantics, so `bertode.train` and `transformers.Trainer` train it the same way. The
encoder (`deq.build_encoder`) owns what depends on the mode: its forward returns the states, the solves' statistics,
one weighted penalty term and a skipped flag (`encoder.EncoderOutput`), which the base model passes on
(`BertODEModelOutput.penalty`, ``skipped``); the DEQ's ``deq_on_nonfinite="skip"`` policy (a failed forward solve
skips the batch; a failed implicit backward rolls the gradients back) is the encoder's. Nothing here reads the mode.
A head adds a projection and a loss; `_result` is its one path to the output: the penalty added to the loss
(weighted by the batch's share of ``num_items_in_batch``, as Trainer passes it with gradient accumulation), and for
a skipped batch a zero loss with no path to any parameter and zero logits.

Sparse prediction (``config.sparse_prediction``, cramming's): while training with ``labels``, the heads that score
positions run only where the label is not -100 (`scored_rows`; a causal LM's position i scores label i + 1), and
their ``logits`` are those rows' (n_targets, vocab), in the order of the flattened (batch, seq) positions. The LM
heads' logits are then detached: the loss (`layers.losses`) never held them in fp32 for the whole batch. In eval
mode, or without labels, every position's logits come back as HF's (``bertode.evaluate``, Trainer's metrics).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel
from transformers import initialization as init
from transformers.utils import logging

from .configuration import BertODEConfig
from .layers.embeddings import BertODEEmbeddings, BertODEMLMHead, BertODEPooler, _Predictions
from .layers.deq import COUNTERS, BertDEQEncoder, build_encoder
from .layers.init import apply_rule
from .layers.outputs import BertODEMaskedLMOutput, BertODEModelOutput
from .solve.dial import current_dial, dialed
from .solve.observe import Observer, observing
from .layers import adaptive, kv_cache, segment_memory
from .layers.sublayers import CrossMemory, sdpa_mask

logger = logging.get_logger(__name__)


class BertODEPreTrainedModel(PreTrainedModel):
    config_class = BertODEConfig
    base_model_prefix = "bert"
    _supports_sdpa = True
    _no_split_modules = ["BertODEEmbeddings", "BertODELayer"]
    supports_gradient_checkpointing = True

    def __init__(self, config: BertODEConfig, *args, **kwargs):
        config.validate_ode()  # fields changed since construction (e.g. from_pretrained(..., mode="deq"))
        super().__init__(config, *args, **kwargs)

    def _refuse_checkpointing(self, method: str) -> None:
        """One line where per-layer checkpointing would save nothing (the encoder says why: DEQ, adjoints)."""
        refusal = self.base_model.encoder.checkpointing_refusal()
        if refusal:
            raise ValueError(f"{method}() is invalid with {refusal}; allowed: mode='discrete' or mode='ode' with "
                             "sensitivity='autograd'")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        """Per-layer activation checkpointing (discrete, ODE with ``sensitivity="autograd"``), transformers' own:
        every layer is a `GradientCheckpointingLayer` (``every_n_layers`` counts them); refused in one line
        where it would save nothing (DEQ, adjoints)."""
        self._refuse_checkpointing("activation_checkpointing_enable")
        self._enable_checkpointing(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """`activation_checkpointing_enable` under its older name, without the FutureWarning transformers 5
        gives its own models' (bertode keeps the name; transformers routes either call here)."""
        self._refuse_checkpointing("gradient_checkpointing_enable")
        self._enable_checkpointing(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        """`activation_checkpointing_disable` under its older name, without transformers 5's FutureWarning."""
        disable = getattr(super(), "_activation_checkpointing_disable", None)
        return disable() if disable is not None else super().gradient_checkpointing_disable()

    def _enable_checkpointing(self, checkpoint_kwargs, every_n_layers: int = 1, offload: bool = False):
        enable = getattr(super(), "_activation_checkpointing_enable", None)
        if enable is None:  # transformers before activation_checkpointing_enable: the one public name
            return super().gradient_checkpointing_enable(checkpoint_kwargs)
        return enable(checkpoint_kwargs, every_n_layers, offload)

    def post_init(self):
        super().post_init()
        # DDP must not broadcast rank 0's counters over the others' (each rank counts its own skips).
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()
                                                  if name.rsplit(".", 1)[-1] in COUNTERS]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, key_mapping: dict | None = None, **kwargs):
        """transformers' ``from_pretrained``. A local directory of another family (BERT's, GPT-2) is converted
        (`convert.load_foreign`), or refused in one line; checkpoints written before the blocks' registry (the
        rk2_gated gate at ``encoder.layer.N.gate``) load into today's names."""
        if not args:
            # The one lazy import back: convert.py builds on this module (from_bert makes these classes).
            from .convert import load_foreign

            converted = load_foreign(cls, pretrained_model_name_or_path, kwargs)
            if converted is not None:
                return converted
        legacy = {r"(encoder\.layer\.\d+)\.gate\.": r"\1.block.gate."}
        return super().from_pretrained(pretrained_model_name_or_path, *args,
                                       key_mapping={**legacy, **(key_mapping or {})}, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if apply_rule(module):  # bertode.zero_init / identity_init marks (init.py)
            return
        if isinstance(module, BertDEQEncoder):
            for name in COUNTERS:
                init.zeros_(getattr(module, name))
        elif isinstance(module, _Predictions) and module.bias is not None:
            init.zeros_(module.bias)
        elif isinstance(module, BertODEEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))

    def solver_stats(self) -> dict:
        """The latest forward's solves (and its backward's, once run), one shape for both modes: totals, per-site
        rows under ``layers``; DEQ also iterations, residuals, converged fraction, counters (`bertode.solve.stats`)."""
        return self.base_model.encoder.solver_stats()

    @property
    def skipped_batches(self) -> int:
        """Batches skipped so far under ``deq_on_nonfinite="skip"`` (0 for ODE models)."""
        return int(self.base_model.encoder.skipped_batches)

    def _encode(self, input_ids, inputs_embeds, **kwargs) -> BertODEModelOutput:
        """The base model's output; if the encoder skips this forward's backward, every parameter of this model
        (the head's too) gets its gradient back as it was before this batch (`Encoder.rollback_guard`)."""
        with self.base_model.encoder.rollback_guard(self.parameters):
            return self.bert(input_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)

    def _sparse(self, labels) -> bool:
        """Whether this forward predicts only the scored positions (module docstring)."""
        return labels is not None and self.training and self.config.sparse_prediction

    def _token_loss(self, flat_logits, flat_labels, num_items_in_batch=None):
        """Cross-entropy over the targets (-100: none); summed / ``num_items_in_batch`` if given."""
        if num_items_in_batch is None:
            return nn.CrossEntropyLoss()(flat_logits.float(), flat_labels)
        return nn.CrossEntropyLoss(reduction="sum")(flat_logits.float(), flat_labels) / num_items_in_batch

    def _result(self, output_class, return_dict, outputs, loss, share=1.0, **logits):
        """A head's output (or HF's tuple) from its loss and logits and the base model's ``outputs``: the loss
        plus ``share`` times the encoder's penalty (``share``: this batch's part of the normalisation when the
        loss is a sum over ``num_items_in_batch``). A skipped batch: a zero loss with no path to any parameter
        and zero logits of each shape, nothing else."""
        if outputs.skipped:
            loss = torch.zeros((), device=self.device, requires_grad=True)
            logits = {name: torch.zeros(value.shape, device=self.device) for name, value in logits.items()}
            return output_class(loss=loss, **logits) if return_dict else (loss, *logits.values())
        if loss is not None and outputs.penalty is not None:
            loss = loss + share * outputs.penalty
        # what the output class has room for of a decoder's extras (the causal LM's: its cache, cross-attentions)
        extras = {name: getattr(outputs, name, None) for name in ("cache", "mems", "cross_attentions")
                  if name in output_class.__dataclass_fields__}
        if not return_dict:
            rest = tuple(logits.values()) + tuple(v for v in (extras.get("cache"), extras.get("mems"), outputs.hidden_states,
                                                              outputs.attentions, extras.get("cross_attentions"))
                                                  if v is not None)
            return ((loss,) + rest) if loss is not None else rest
        return output_class(loss=loss, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                            solver_stats=outputs.solver_stats, trajectory=outputs.trajectory, **extras, **logits)


@torch.compiler.disable  # a data-dependent row count: run eagerly rather than recompile for every batch
def scored_rows(hidden: torch.Tensor, labels: torch.Tensor, shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse prediction's rows: ``hidden`` (batch, seq, width) at the positions whose label is not -100, and
    those labels, flattened in (batch, seq) order; ``shift``: position i scores label i + 1 (causal LM)."""
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    labels = labels.to(hidden.device).reshape(-1)
    # One host read (the number of targets); index_select's backward is an index_add, where a boolean
    # mask's would be a second data-dependent index_put.
    chosen = (labels != -100).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, chosen), labels.index_select(0, chosen)


class BertODEModel(BertODEPreTrainedModel):
    def __init__(self, config: BertODEConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertODEEmbeddings(config)
        self.encoder = build_encoder(config)
        pre = getattr(config, "norm_position", "post") == "pre"  # pre-LN layers end with a LayerNorm
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if pre else None
        self.pooler = BertODEPooler(config) if add_pooling_layer else None
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
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cache=None,
        use_cache=None,
        output_hidden_states=None,
        output_attentions=None,
        output_trajectory=False,
        return_dict=None,
        past_key_values=None,
        mems=None,
        **kwargs,
    ):
        """``output_hidden_states``: the embeddings and every layer's output (a DEQ: the
        embeddings and z*). ``output_attentions``: one (batch, heads, seq, seq) tensor of
        attention probabilities per layer, from an eager attention: an ODE layer's first
        evaluation (at the solve's start: at Euler-1 BERT's attention), a DEQ layer's last
        (at the fixed point); ``"all"`` stacks every evaluation of the forward (a decoder's
        cross-attention: ``cross_attentions``, by the same rule).
        ``output_trajectory``: every solve's times, states and outputs (`bertode.solve.observe`).

        A decoder (``is_decoder``) takes transformers' key/value ``cache`` (``past_key_values``, its
        older name) and ``use_cache`` (default ``config.use_cache``), as HF's BERT: the tokens given
        follow the cached ones, ``attention_mask`` spans both, and the output's ``cache`` holds them
        all (`layers.kv_cache`; one line where caching would not be exact). With ``add_cross_attention``
        it attends to ``encoder_hidden_states`` (masked by ``encoder_attention_mask``). With ``config.mem_len`` > 0
        ``mems`` (the previous segment's output ``mems``; None at a text's first segment) are attended to first, and
        the output's ``mems`` carry the memory on (`layers.segment_memory`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("BertODEModel.forward needs exactly one of input_ids or inputs_embeds")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache = cache if cache is not None else past_key_values
        session = kv_cache.open_session(self, cache, use_cache, encoder_hidden_states)
        past = session.past if session is not None else 0
        batch, new = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if attention_mask is not None and past and attention_mask.shape[-1] != past + new:
            raise ValueError(f"attention_mask of length {attention_mask.shape[-1]} is invalid with {past} cached "
                             f"positions; allowed: a mask over the cached and the new positions")
        memory = segment_memory.open_memory(self.config, mems, batch, self.config.hidden_size)
        attention_mask = segment_memory.spanning(attention_mask, memory, new)
        observer = None
        if output_attentions or output_trajectory:
            keep = "all" if output_attentions == "all" else self.encoder.observed_attention
            observer = Observer(attentions=bool(output_attentions), trajectory=bool(output_trajectory), keep=keep)
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                                 inputs_embeds=inputs_embeds, past=past)
        cross = None
        if encoder_hidden_states is not None and self.config.add_cross_attention:
            cross = CrossMemory(encoder_hidden_states, sdpa_mask(encoder_attention_mask))
        with self.encoder.rollback_guard(self.parameters), observing(observer), kv_cache.caching(session), \
                segment_memory.remembering(memory):
            remembered = memory.length if memory is not None else 0
            mask = sdpa_mask(attention_mask, self.config.is_decoder, new, hidden.device, past + remembered)
            # cross only for a decoder that cross-attends: encoders users wrote take (hidden, mask, output_hidden_states)
            encoded = self.encoder(hidden, mask, output_hidden_states, *([cross] if cross is not None else []))
            if session is not None:
                session.check_complete()
        sequence_output, states = encoded.hidden, encoded.states
        if self.final_norm is not None:  # the last hidden state is the normed one (as GPT-2's)
            sequence_output = self.final_norm(sequence_output)
            states = states[:-1] + (sequence_output,) if states is not None else None
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        attentions, trajectory = (observer.attentions(), observer.trajectory()) if observer is not None else (None, None)
        cross_attentions = observer.attentions(cross=True) if observer is not None else None
        cache = session.cache if session is not None else None
        mems = memory.updated() if memory is not None and not encoded.skipped else None
        if not return_dict:
            return tuple(v for v in (sequence_output, pooled, cache, mems, states, attentions, cross_attentions)
                         if v is not None)
        return BertODEModelOutput(last_hidden_state=sequence_output, pooler_output=pooled, hidden_states=states,
                                  attentions=attentions, cross_attentions=cross_attentions, cache=cache,
                                  solver_stats=encoded.stats, trajectory=trajectory, penalty=encoded.penalty,
                                  skipped=encoded.skipped or None, mems=mems)


def kept_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """``hidden`` (batch, seq, width) at the positions whose logits are wanted (transformers'
    ``logits_to_keep``): an int k keeps the last k (0: every position), a 1-D tensor those indices."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:] if logits_to_keep else hidden
    return hidden[:, logits_to_keep]


class TiedMLMDecoder:
    """Heads with ``cls.predictions``: the decoder tied to the word embeddings (bias: ``cls.predictions.bias``)."""

    @property
    def _tied_weights_keys(self) -> dict:  # "linear" (GPT-2) has no decoder bias; "adaptive" no decoder (its ties)
        bias = {"cls.predictions.decoder.bias": "cls.predictions.bias"} if self.config.lm_head_type == "bert" else {}
        tied = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight", **bias}
        return adaptive.tied_weights_keys(self.config) if self.config.lm_head_type == "adaptive" else tied

    def get_output_embeddings(self):  # None for the adaptive softmax, as transformers' Transformer-XL
        return getattr(self.cls.predictions, "decoder", None)

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias if self.cls.predictions.bias is not None else None


class LanguageModelHead(TiedMLMDecoder, BertODEPreTrainedModel):
    """Logits and their cross-entropy: masked LM (each position scores its own label), or causal
    (``predicts_next_token``: position i scores label i + 1, or ``shift_labels[i]`` when given pre-shifted)."""

    output_class = BertODEMaskedLMOutput
    predicts_next_token = False

    def __init__(self, config: BertODEConfig):
        super().__init__(config)
        self.bert = BertODEModel(config, add_pooling_layer=False)
        self.cls = BertODEMLMHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                output_trajectory=False, return_dict=None, num_items_in_batch=None, penalty_share=None, **kwargs):
        return self._predict(input_ids, inputs_embeds, labels, return_dict, num_items_in_batch,
                             penalty_share=penalty_share, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
                             output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                             output_trajectory=output_trajectory)

    def _predict(self, input_ids, inputs_embeds, labels, return_dict, num_items_in_batch, shift_labels=None,
                 logits_to_keep=0, penalty_share=None, **encode):
        """The encoder, then the head's logits (``logits_to_keep``: at those positions only, see
        `kept_positions`) and, with ``labels``, the loss. As transformers' ``ForCausalLMLoss``: a causal
        LM's labels are shifted inside unless ``shift_labels`` (already shifted) are given, which then
        are the targets; without ``labels`` there is no loss.

        The encoder's penalty (a mean over this batch's positions) is added times this batch's share of
        the normalisation: its share of ``num_items_in_batch``'s targets, unless ``penalty_share`` says
        otherwise. `bertode.train` passes its share of the global batch's rows, so that a step's penalty is
        the mean over all its positions however the batch is split (ranks, micro-batches), also when the
        parts hold different numbers of targets."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        criterion = current_dial().exit  # the `kl` exit criterion reads this head's distributions
        reading = dialed(readout=self.readout) if getattr(criterion, "needs_readout", False) else contextlib.nullcontext()
        with reading:
            outputs = self._encode(input_ids, inputs_embeds, **encode)
        targets, shift = (shift_labels, False) if shift_labels is not None else (labels, self.predicts_next_token)
        if labels is None:
            targets = None
        loss, share = None, 1.0
        if self._sparse(targets):
            hidden, targets = scored_rows(outputs.last_hidden_state, targets, shift)
            loss, logits = self.cls.predictions.scored(hidden, targets, "mean" if num_items_in_batch is None else "sum")
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
                share = targets.numel() / num_items_in_batch
            share = share if penalty_share is None else penalty_share
            return self._result(self.output_class, return_dict, outputs, loss, share, logits=logits)
        logits = self.cls(kept_positions(outputs.last_hidden_state, logits_to_keep))
        if targets is not None:
            scored, targets = (logits[:, :-1], targets[:, 1:]) if shift else (logits, targets)
            targets = targets.reshape(-1).to(logits.device)
            loss = self._token_loss(scored.reshape(-1, self.config.vocab_size), targets, num_items_in_batch)
            share = 1.0 if num_items_in_batch is None else (targets != -100).sum() / num_items_in_batch
            share = share if penalty_share is None else penalty_share
        return self._result(self.output_class, return_dict, outputs, loss, share, logits=logits)

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """This head's logits for the encoder's output ``hidden`` (after the final LayerNorm of a
        pre-LN model): what the per-iterate curve and the ``kl`` exit criterion score."""
        final_norm = self.bert.final_norm
        return self.cls(final_norm(hidden) if final_norm is not None else hidden)


class BertODEForMaskedLM(LanguageModelHead):
    """BERT's masked-LM head: each position's logits score its own label."""


AutoConfig.register("bertode", BertODEConfig, exist_ok=True)
AutoModel.register(BertODEConfig, BertODEModel, exist_ok=True)
AutoModelForMaskedLM.register(BertODEConfig, BertODEForMaskedLM, exist_ok=True)
