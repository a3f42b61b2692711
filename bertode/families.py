"""The BERT family, as data: for each ``model_type`` that `from_bert` converts, how its
config becomes a `BertODEConfig`, how its parameter names become bertode's (regex
renames), and which HF architectures map to which bertode head.

Every BERT-family model here is a post-LN encoder of BERT layers (attention + Add & Norm,
feed-forward + Add & Norm); what differs is naming, the embeddings (RoBERTa's position
numbering, ELECTRA's and ALBERT's factorised embeddings with a projection, DistilBERT's
missing token types), ALBERT's one shared layer (``weight_tying=True``) and the
activations of the heads. GPT-2 is the same two sublayers pre-LN (``norm_position="pre"``,
a final LayerNorm), causal (``is_decoder=True``), with no embedding LayerNorm and a bare
tied decoder; its Conv1D weights are Linear weights transposed and its fused Q/K/V
projection is split (`gpt2_state`). Adding a family is adding a `Family` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from . import heads
from .causal_lm import BertODEForCausalLM
from .modeling import BertODEForMaskedLM, BertODEModel

# The BertConfig fields every BERT-layout config shares with BertODEConfig.
BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
               "type_vocab_size", "initializer_range", "layer_norm_eps", "classifier_dropout")
COMMON_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "id2label", "label2id", "problem_type",
                 "tie_word_embeddings", "is_decoder",  # is_decoder: causal attention (sublayers.sdpa_mask)
                 "add_cross_attention")  # a decoder's cross-attention sites (encoder.BertODELayer)

# bertode's names inside one layer, after the family's layer prefix.
BERT_LAYER = [
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"encoder.layer.\1.attention.branch.\2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layer.\1.attention.branch.dense."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"encoder.layer.\1.attention.norm."),
    (r"encoder\.layer\.(\d+)\.crossattention\.self\.(query|key|value)\.", r"encoder.layer.\1.cross_attention.branch.\2."),
    (r"encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"encoder.layer.\1.cross_attention.branch.dense."),
    (r"encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"encoder.layer.\1.cross_attention.norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"encoder.layer.\1.feed_forward.branch.intermediate."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"encoder.layer.\1.feed_forward.branch.dense."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"encoder.layer.\1.feed_forward.norm."),
]
# Heads laid out as a dense + activation + out projection on the first token (RoBERTa,
# ELECTRA): the dense is bertode's pooler.
DENSE_CLASSIFIER = [(r"^classifier\.dense\.", "bert.pooler.dense."), (r"^classifier\.out_proj\.", "classifier.")]

BERT_HEADS = {"Model": BertODEModel, "ForMaskedLM": BertODEForMaskedLM,
              "ForSequenceClassification": heads.BertODEForSequenceClassification,
              "ForTokenClassification": heads.BertODEForTokenClassification,
              "ForQuestionAnswering": heads.BertODEForQuestionAnswering,
              "ForMultipleChoice": heads.BertODEForMultipleChoice}


@dataclass(frozen=True)
class Family:
    """How one ``model_type`` converts. ``heads`` maps an architecture suffix (``Model``,
    ``ForMaskedLM``, ...) after ``class_prefix`` to the bertode class; ``config`` gives
    the BertODEConfig fields; ``renames`` apply in order after the base-model prefix
    has become ``bert.``; a base model of a family without a pooler converts to a
    `BertODEModel` without one."""

    class_prefix: str
    prefix: str
    config: Callable
    renames: list
    heads: dict
    base_pooler: bool = True  # whether the family's base model has a pooler
    adapt: Callable | None = None  # (source's state dict, its config) -> tensors laid out as bertode's, before renaming


def _common(hf) -> dict:
    return {name: getattr(hf, name) for name in COMMON_FIELDS if getattr(hf, name, None) is not None}


def _absolute_positions(hf) -> None:
    scheme = getattr(hf, "position_embedding_type", "absolute") or "absolute"
    if scheme != "absolute":
        raise ValueError(f"from_bert: position_embedding_type={scheme!r} ({hf.model_type}) is not supported; "
                         "allowed: 'absolute'")


def bert_config(hf) -> dict:
    _absolute_positions(hf)
    return {**{name: getattr(hf, name) for name in BERT_FIELDS if hasattr(hf, name)}, **_common(hf)}


def roberta_config(hf) -> dict:
    return {**bert_config(hf), "position_scheme": "after_padding", "head_hidden_act": "gelu"}


def electra_config(hf) -> dict:
    return {**bert_config(hf), "embedding_size": hf.embedding_size,
            "embedding_projection": hf.embedding_size != hf.hidden_size,
            "head_hidden_act": "gelu", "pooler_hidden_act": "gelu"}


def albert_config(hf) -> dict:
    if hf.num_hidden_groups != 1 or hf.inner_group_num != 1:
        raise ValueError(f"from_bert: ALBERT with num_hidden_groups={hf.num_hidden_groups}, inner_group_num="
                         f"{hf.inner_group_num} is not supported; allowed: 1 and 1 (one shared layer)")
    fields = bert_config(hf)
    fields.pop("classifier_dropout", None)
    return {**fields, "classifier_dropout": hf.classifier_dropout_prob, "embedding_size": hf.embedding_size,
            "embedding_projection": True, "weight_tying": True}


def distilbert_config(hf) -> dict:
    return {"vocab_size": hf.vocab_size, "hidden_size": hf.dim, "num_hidden_layers": hf.n_layers,
            "num_attention_heads": hf.n_heads, "intermediate_size": hf.hidden_dim, "hidden_act": hf.activation,
            "hidden_dropout_prob": hf.dropout, "attention_probs_dropout_prob": hf.attention_dropout,
            "max_position_embeddings": hf.max_position_embeddings, "type_vocab_size": 0,
            "initializer_range": hf.initializer_range, "layer_norm_eps": 1e-12,
            "classifier_dropout": hf.seq_classif_dropout, "pooler_hidden_act": "relu", **_common(hf)}


def gpt2_config(hf) -> dict:
    refusals = {"scale_attn_weights": (hf.scale_attn_weights, True), "add_cross_attention":
                (getattr(hf, "add_cross_attention", False), False), "scale_attn_by_inverse_layer_idx":
                (hf.scale_attn_by_inverse_layer_idx, False), "embd_pdrop": (hf.embd_pdrop, hf.resid_pdrop)}
    for name, (value, allowed) in refusals.items():
        if value != allowed:
            raise ValueError(f"from_bert: GPT-2 with {name}={value!r} is not supported; allowed: {allowed!r}"
                             + (" (resid_pdrop: one hidden dropout)" if name == "embd_pdrop" else ""))
    return {"vocab_size": hf.vocab_size, "hidden_size": hf.n_embd, "num_hidden_layers": hf.n_layer,
            "num_attention_heads": hf.n_head, "intermediate_size": hf.n_inner or 4 * hf.n_embd,
            "hidden_act": hf.activation_function, "hidden_dropout_prob": hf.resid_pdrop,
            "attention_probs_dropout_prob": hf.attn_pdrop, "max_position_embeddings": hf.n_positions,
            "type_vocab_size": 0, "initializer_range": hf.initializer_range, "layer_norm_eps": hf.layer_norm_epsilon,
            # GPT-2's embedding has no padding row (BERT's pad row gets no gradient): none here, whatever
            # pad id the source names (it changes nothing GPT-2 computes; pass pad_token_id to generate()).
            **_common(hf), "pad_token_id": None, "is_decoder": True, "norm_position": "pre", "embedding_norm": False,
            "lm_head_type": "linear"}


def gpt2_state(state: dict, config=None) -> dict:
    """GPT-2's Conv1D weights (in, out) become Linear weights (out, in); the fused
    ``attn.c_attn`` (in, 3 * hidden) becomes ``attn.query``/``key``/``value``."""
    adapted = {}
    for key, tensor in state.items():
        if ".attn.c_attn." in key:
            for part, chunk in zip(("query", "key", "value"), tensor.chunk(3, dim=-1)):
                adapted[key.replace(".c_attn.", f".{part}.")] = chunk.t() if key.endswith("weight") else chunk
        elif key.endswith((".c_proj.weight", ".c_fc.weight")):
            adapted[key] = tensor.t()
        else:
            adapted[key] = tensor
    return adapted


GPT2 = Family(
    "GPT2", "transformer", gpt2_config,
    [(r"(^|\.)wte\.", r"\1embeddings.word_embeddings."),
     (r"(^|\.)wpe\.", r"\1embeddings.position_embeddings."),
     (r"(^|\.)h\.(\d+)\.ln_1\.", r"\1encoder.layer.\2.attention.norm."),
     (r"(^|\.)h\.(\d+)\.attn\.(query|key|value)\.", r"\1encoder.layer.\2.attention.branch.\3."),
     (r"(^|\.)h\.(\d+)\.attn\.c_proj\.", r"\1encoder.layer.\2.attention.branch.dense."),
     (r"(^|\.)h\.(\d+)\.ln_2\.", r"\1encoder.layer.\2.feed_forward.norm."),
     (r"(^|\.)h\.(\d+)\.mlp\.c_fc\.", r"\1encoder.layer.\2.feed_forward.branch.intermediate."),
     (r"(^|\.)h\.(\d+)\.mlp\.c_proj\.", r"\1encoder.layer.\2.feed_forward.branch.dense."),
     (r"(^|\.)ln_f\.", r"\1final_norm."),
     (r"^lm_head\.weight$", "cls.predictions.decoder.weight")],
    {"Model": BertODEModel, "LMHeadModel": BertODEForCausalLM}, base_pooler=False, adapt=gpt2_state)

def deberta_config(hf, v2: bool = False) -> dict:
    """DeBERTa (v1; ``v2``: DeBERTa-v2/v3): BERT's fields and, with ``relative_attention``, the disentangled
    attention's (``position_scheme="deberta"``); what bertode does not compute is refused in one line."""
    relative, terms = bool(getattr(hf, "relative_attention", False)), list(hf.pos_att_type or [])
    name = "DeBERTa-v2" if v2 else "DeBERTa"
    refusals = {  # field: (value, supported, what is supported)
        "conv_kernel_size": (getattr(hf, "conv_kernel_size", 0), lambda v: v <= 0, "0 (no ConvLayer)"),
        "talking_head": (getattr(hf, "talking_head", False), lambda v: not v, "False"),
        "attention_head_size": (getattr(hf, "attention_head_size", None), lambda v: v in (None, hf.hidden_size //
                                hf.num_attention_heads), f"hidden_size / num_attention_heads = "
                                f"{hf.hidden_size // hf.num_attention_heads}"),
        "pos_att_type": (terms, lambda v: all(t in ("c2p", "p2c") for t in v) and bool(v) == relative,
                         "a list of 'c2p' and/or 'p2c' (empty without relative_attention)"),
        "position_biased_input": (getattr(hf, "position_biased_input", True), lambda v: v or relative,
                                  "True without relative_attention"),
        "pooler_hidden_size": (getattr(hf, "pooler_hidden_size", hf.hidden_size), lambda v: v == hf.hidden_size,
                               f"hidden_size={hf.hidden_size}"),
        "z_steps": (getattr(hf, "z_steps", 0), lambda v: v <= 1, "0 or 1")}
    for field, (value, supported, allowed) in refusals.items():
        if not supported(value):
            raise ValueError(f"from_bert: {name} with {field}={value!r} is not supported; allowed: {allowed}")
    fields = {**bert_config(hf), "pooler_hidden_act": hf.pooler_hidden_act,
              "classifier_dropout": getattr(hf, "cls_dropout", None)}
    width = getattr(hf, "embedding_size", None) or hf.hidden_size
    if width != hf.hidden_size:  # DeBERTa's embed_proj
        fields.update(embedding_size=width, embedding_projection="before_norm")
    if not getattr(hf, "legacy", True):  # the MLM head's decoder is the word embeddings, whatever the config says
        fields["tie_word_embeddings"] = True
    if not relative:  # BERT's attention with absolute positions (scaled by 1 / sqrt(head_size): no terms)
        return fields
    norm = [part.strip() for part in str(getattr(hf, "norm_rel_ebd", "")).lower().split("|")] if v2 else []
    return {**fields, "position_scheme": "deberta", "max_relative_positions": hf.max_relative_positions,
            "position_buckets": getattr(hf, "position_buckets", -1) if v2 else -1, "pos_att_type": terms,
            "share_att_key": bool(getattr(hf, "share_att_key", False)) if v2 else False,
            "norm_rel_ebd": "layer_norm" if "layer_norm" in norm else None,
            "position_biased_input": bool(getattr(hf, "position_biased_input", True))}


def deberta_state(state: dict, config) -> dict:
    """DeBERTa v1's fused ``in_proj`` (per head: query, key, value rows) becomes query/key/value (biases
    ``q_bias``, zero, ``v_bias``); its bias-free ``pos_proj`` gets a zero bias (v2's ``pos_key_proj`` has one)."""
    adapted = {}
    for key, tensor in state.items():
        if key.endswith(".attention.self.in_proj.weight"):
            stem = key[:-len("in_proj.weight")]
            per_head = tensor.view(config.num_attention_heads, 3, -1, tensor.shape[1])
            for index, part in enumerate(("query", "key", "value")):
                adapted[f"{stem}{part}.weight"] = per_head[:, index].reshape(-1, tensor.shape[1])
            adapted[f"{stem}key.bias"] = tensor.new_zeros(tensor.shape[0] // 3)
        elif key.endswith((".q_bias", ".v_bias")):
            adapted[key[:-len("q_bias")] + ("query" if key.endswith("q_bias") else "value") + ".bias"] = tensor
        elif key.endswith(".pos_proj.weight"):
            adapted[key.replace(".pos_proj.", ".pos_key_proj.")] = tensor
            adapted[key.replace(".pos_proj.weight", ".pos_key_proj.bias")] = tensor.new_zeros(tensor.shape[0])
        else:
            adapted[key.replace(".pos_q_proj.", ".pos_query_proj.")] = tensor
    return adapted


DEBERTA_RENAMES = [
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)_proj\.", r"encoder.layer.\1.attention.self.\2."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(pos_key_proj|pos_query_proj)\.",
     r"encoder.layer.\1.attention.branch.positions.\2."),
    *BERT_LAYER,
    (r"(^|\.)embeddings\.embed_proj\.", r"\1embeddings.project."),
    (r"(^|\.)encoder\.LayerNorm\.", r"\1encoder.rel_embeddings.norm."),  # v2's norm_rel_ebd="layer_norm"
    (r"^pooler\.dense\.", "bert.pooler.dense."),  # ContextPooler
    (r"^lm_predictions\.lm_head\.(dense|LayerNorm)\.", r"cls.predictions.transform.\1."),  # legacy=False
    (r"^lm_predictions\.lm_head\.bias$", "cls.predictions.bias")]
DEBERTA_HEADS = {name: BERT_HEADS[name] for name in ("Model", "ForMaskedLM", "ForSequenceClassification",
                                                    "ForTokenClassification", "ForQuestionAnswering")}

ROBERTA = Family(
    "Roberta", "roberta", roberta_config,
    BERT_LAYER + DENSE_CLASSIFIER + [
        (r"^lm_head\.dense\.", "cls.predictions.transform.dense."),
        (r"^lm_head\.layer_norm\.", "cls.predictions.transform.LayerNorm."),
        (r"^lm_head\.decoder\.(weight|bias)$", r"cls.predictions.decoder.\1"),
        (r"^lm_head\.bias$", "cls.predictions.bias")],
    BERT_HEADS)

FAMILIES: dict[str, Family] = {
    "bert": Family("Bert", "bert", bert_config, BERT_LAYER, {
        **BERT_HEADS, "ForPreTraining": heads.BertODEForPreTraining,
        "ForNextSentencePrediction": heads.BertODEForNextSentencePrediction, "LMHeadModel": BertODEForCausalLM}),
    "roberta": ROBERTA,
    "xlm-roberta": replace(ROBERTA, class_prefix="XLMRoberta"),
    "camembert": replace(ROBERTA, class_prefix="Camembert"),
    "electra": Family(
        "Electra", "electra", electra_config,
        BERT_LAYER + DENSE_CLASSIFIER + [
            (r"(^|\.)embeddings_project\.", r"\1embeddings.project."),
            (r"^generator_predictions\.dense\.", "cls.predictions.transform.dense."),
            (r"^generator_predictions\.LayerNorm\.", "cls.predictions.transform.LayerNorm."),
            (r"^generator_lm_head\.weight$", "cls.predictions.decoder.weight"),
            (r"^generator_lm_head\.bias$", "cls.predictions.bias"),
            (r"^sequence_summary\.summary\.", "bert.pooler.dense.")],
        BERT_HEADS, base_pooler=False),
    "albert": Family(
        "Albert", "albert", albert_config,
        [(r"encoder\.embedding_hidden_mapping_in\.", "embeddings.project."),
         (r"encoder\.albert_layer_groups\.0\.albert_layers\.0\.attention\.(query|key|value|dense)\.",
          r"encoder.layer.0.attention.branch.\1."),
         (r"encoder\.albert_layer_groups\.0\.albert_layers\.0\.attention\.LayerNorm\.", "encoder.layer.0.attention.norm."),
         (r"encoder\.albert_layer_groups\.0\.albert_layers\.0\.ffn\.", "encoder.layer.0.feed_forward.branch.intermediate."),
         (r"encoder\.albert_layer_groups\.0\.albert_layers\.0\.ffn_output\.", "encoder.layer.0.feed_forward.branch.dense."),
         (r"encoder\.albert_layer_groups\.0\.albert_layers\.0\.full_layer_layer_norm\.", "encoder.layer.0.feed_forward.norm."),
         (r"(^|\.)pooler\.(weight|bias)$", r"\1pooler.dense.\2"),
         (r"^predictions\.dense\.", "cls.predictions.transform.dense."),
         (r"^predictions\.LayerNorm\.", "cls.predictions.transform.LayerNorm."),
         (r"^predictions\.decoder\.(weight|bias)$", r"cls.predictions.decoder.\1"),
         (r"^predictions\.bias$", "cls.predictions.bias"),
         (r"^sop_classifier\.classifier\.", "cls.seq_relationship.")],
        {**BERT_HEADS, "ForPreTraining": heads.BertODEForPreTraining}),
    "distilbert": Family(
        "DistilBert", "distilbert", distilbert_config,
        [(r"transformer\.layer\.(\d+)\.attention\.q_lin\.", r"encoder.layer.\1.attention.branch.query."),
         (r"transformer\.layer\.(\d+)\.attention\.k_lin\.", r"encoder.layer.\1.attention.branch.key."),
         (r"transformer\.layer\.(\d+)\.attention\.v_lin\.", r"encoder.layer.\1.attention.branch.value."),
         (r"transformer\.layer\.(\d+)\.attention\.out_lin\.", r"encoder.layer.\1.attention.branch.dense."),
         (r"transformer\.layer\.(\d+)\.sa_layer_norm\.", r"encoder.layer.\1.attention.norm."),
         (r"transformer\.layer\.(\d+)\.ffn\.lin1\.", r"encoder.layer.\1.feed_forward.branch.intermediate."),
         (r"transformer\.layer\.(\d+)\.ffn\.lin2\.", r"encoder.layer.\1.feed_forward.branch.dense."),
         (r"transformer\.layer\.(\d+)\.output_layer_norm\.", r"encoder.layer.\1.feed_forward.norm."),
         (r"^vocab_transform\.", "cls.predictions.transform.dense."),
         (r"^vocab_layer_norm\.", "cls.predictions.transform.LayerNorm."),
         (r"^vocab_projector\.weight$", "cls.predictions.decoder.weight"),
         (r"^vocab_projector\.bias$", "cls.predictions.bias"),
         (r"^pre_classifier\.", "bert.pooler.dense.")],
        BERT_HEADS, base_pooler=False),
    "gpt2": GPT2,
    "deberta": Family("Deberta", "deberta", deberta_config, DEBERTA_RENAMES, DEBERTA_HEADS, base_pooler=False,
                      adapt=deberta_state),
    "deberta-v2": Family("DebertaV2", "deberta", lambda hf: deberta_config(hf, v2=True), DEBERTA_RENAMES,
                         {**DEBERTA_HEADS, "ForMultipleChoice": heads.BertODEForMultipleChoice}, base_pooler=False),
}


def supported() -> str:
    return ", ".join(repr(name) for name in FAMILIES)


def family_of(model_type) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"from_bert: model_type={model_type!r} is not supported; allowed: {supported()} "
                         "(BERT-layer encoders, and GPT-2)")
    return FAMILIES[model_type]


def target_class(family: Family, architecture: str):
    """The bertode class for an HF architecture name of this family; one line otherwise."""
    suffix = architecture[len(family.class_prefix):] if architecture.startswith(family.class_prefix) else None
    if suffix not in family.heads:
        allowed = ", ".join(family.class_prefix + name for name in family.heads)
        raise ValueError(f"from_bert: architecture {architecture!r} is not supported; allowed: {allowed}")
    return family.heads[suffix]
