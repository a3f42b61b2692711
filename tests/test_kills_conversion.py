"""Oracle tests that kill the mutants of `bertode/layers/embeddings.py`, `bertode/convert.py` and
`bertode/families.py` (issue 29; docs/testing.md, "Mutation testing"): each variant of the embeddings
against its HF source or a sum written out here, the conversion tables' key sets, and the one-line refusals."""

import json
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

import bertode
from bertode.convert import rename_key
from bertode.families import FAMILIES
from bertode.layers.embeddings import BertODEEmbeddings

SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=40)


def _ids(rows=3, length=7, pad=1, seed=0):
    """Token ids above ``pad`` with padding at the end of the first row and in the middle of the last."""
    ids = torch.randint(pad + 1, SIZES["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(seed))
    ids[0, -2:] = pad
    ids[-1, 2] = pad
    return ids


def _roberta():
    torch.manual_seed(0)
    source = transformers.RobertaModel(transformers.RobertaConfig(**SIZES, pad_token_id=1, type_vocab_size=1))
    return source.double().eval(), bertode.from_bert(source, solver="euler", steps=1).double().eval()


def test_roberta_embeddings_equal_hf_from_ids_after_a_cache_and_from_inputs_embeds():
    """RoBERTa's numbering (HF's embeddings as the oracle, float64, 3 rows): from ids without ``past`` (its
    default is 0), after ``past`` cached tokens (HF's ``cache_length``), and from ``inputs_embeds``."""
    source, ours = _roberta()
    ids = _ids()
    assert (ours.embeddings(input_ids=ids) - source.embeddings(input_ids=ids)).abs().max() <= 1e-12
    for past in (1, 3):
        want = RobertaEmbeddings.create_position_ids_from_input_ids(ids, 1, past)
        assert torch.equal(ours.embeddings._positions(ids, ids.shape[1], past), want)
        got = ours.embeddings(input_ids=ids, past=past)
        assert (got - source.embeddings(input_ids=ids, cache_length=past)).abs().max() <= 1e-12
    embeds = source.embeddings.word_embeddings(ids)
    got = ours.embeddings(inputs_embeds=embeds)
    assert (got - source.embeddings(inputs_embeds=embeds)).abs().max() <= 1e-12
    # after `past` tokens without ids, every token is a real one: HF's rule for ids that hold no padding
    real = ids.clamp(min=2)
    for past in (0, 2):
        want = RobertaEmbeddings.create_position_ids_from_input_ids(real, 1, past)
        assert torch.equal(ours.embeddings._positions(None, ids.shape[1], past).expand_as(want), want)


def test_without_a_pad_token_roberta_numbering_takes_token_0_as_padding():
    config = bertode.BertODEConfig(**SIZES, position_scheme="after_padding", pad_token_id=None)
    ids = _ids(pad=0)
    want = RobertaEmbeddings.create_position_ids_from_input_ids(ids, 0)
    assert torch.equal(BertODEEmbeddings(config)._positions(ids, ids.shape[1], 0), want)


def test_given_position_ids_are_read_as_hf_reads_them():
    torch.manual_seed(0)
    source = transformers.BertModel(transformers.BertConfig(**SIZES)).double().eval()
    ours = bertode.from_bert(source).double().eval()
    ids, types = _ids(), torch.randint(0, 2, (3, 7), generator=torch.Generator().manual_seed(1))
    positions = torch.randint(0, SIZES["max_position_embeddings"], (3, 7), generator=torch.Generator().manual_seed(2))
    for given in (None, positions):
        got = ours.embeddings(input_ids=ids, token_type_ids=types, position_ids=given)
        assert (got - source.embeddings(input_ids=ids, token_type_ids=types, position_ids=given)).abs().max() <= 1e-12


def test_albert_with_embeddings_as_wide_as_the_layers_keeps_its_projection():
    """``embedding_projection=True`` (ALBERT's mapping) even where the widths agree; None: where they differ."""
    torch.manual_seed(0)
    source = transformers.AlbertModel(transformers.AlbertConfig(**SIZES, embedding_size=32)).double().eval()
    ours = bertode.from_bert(source, solver="euler", steps=1).double().eval()
    ids = _ids(pad=0)
    assert (ours(input_ids=ids).last_hidden_state - source(input_ids=ids).last_hidden_state).abs().max() <= 1e-10
    narrow = BertODEEmbeddings(bertode.BertODEConfig(**SIZES, embedding_size=16))
    assert narrow.project.weight.shape == (32, 16) and narrow(input_ids=ids).shape == (3, 7, 32)


def test_a_fresh_model_has_the_hf_model_s_state_dict_keys_and_shapes():
    """Untied, so ``cls.predictions.bias`` is a tensor of its own; ``position_ids`` is not saved (HF's neither)."""
    config = dict(SIZES, tie_word_embeddings=False)
    source = transformers.BertForMaskedLM(transformers.BertConfig(**config))
    ours = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**config, mode="discrete"))
    want = {rename_key(key, FAMILIES["bert"]): tuple(value.shape) for key, value in source.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == want
    assert ours.cls.predictions.loss_kernel is None  # no sparse `scored` call yet: no kernel has run


# Distinct values for every field a family's table maps (dropouts, init, eps, activations, ids), so a field read from
# the wrong source field, or left at bertode's default, shows.
DISTINCT = dict(hidden_dropout_prob=0.11, attention_probs_dropout_prob=0.12, initializer_range=0.031,
                layer_norm_eps=1e-7, hidden_act="relu", type_vocab_size=3, bos_token_id=5, eos_token_id=6,
                problem_type="multi_label_classification", tie_word_embeddings=False, is_decoder=True)
BERTS = {
    "bert": (lambda: transformers.BertConfig(**SIZES, **DISTINCT, classifier_dropout=0.14, pad_token_id=2), {}),
    "roberta": (lambda: transformers.RobertaConfig(**SIZES, **DISTINCT, classifier_dropout=0.14, pad_token_id=2),
                dict(position_scheme="after_padding", head_hidden_act="gelu")),
    "electra": (lambda: transformers.ElectraConfig(**SIZES, **DISTINCT, classifier_dropout=0.14, pad_token_id=2,
                                                   embedding_size=16),
                dict(embedding_size=16, embedding_projection=True, head_hidden_act="gelu", pooler_hidden_act="gelu")),
    "albert": (lambda: transformers.AlbertConfig(**SIZES, **DISTINCT, classifier_dropout_prob=0.14, pad_token_id=2,
                                                 embedding_size=16),
               dict(embedding_size=16, embedding_projection=True, weight_tying=True)),
}


@pytest.mark.parametrize("model_type", list(BERTS))
def test_every_mapped_config_field_is_the_source_s(model_type):
    make, extra = BERTS[model_type]
    hf = make()
    hf.id2label, hf.label2id = {0: "a", 1: "b"}, {"a": 0, "b": 1}
    want = {**{name: getattr(hf, name) for name in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                    "num_attention_heads", "intermediate_size",
                                                    "max_position_embeddings", "pad_token_id")},
            **DISTINCT, "classifier_dropout": 0.14, "id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1},
            **extra}
    if hasattr(hf, "add_cross_attention"):  # not an ALBERT field
        want["add_cross_attention"] = False
    fields = FAMILIES[model_type].config(hf)
    assert {name: fields.get(name, "missing") for name in want} == want
    assert "classifier_dropout_prob" not in fields and set(fields) <= set(bertode.BertODEConfig().to_dict())


LABELS = dict(id2label={0: "LABEL_0", 1: "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1})  # transformers' default


def test_distilbert_and_gpt2_fields_are_read_from_their_own_names():
    hf = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48, activation="relu",
                                       dropout=0.11, attention_dropout=0.12, max_position_embeddings=40,
                                       initializer_range=0.031, seq_classif_dropout=0.14, pad_token_id=2)
    assert FAMILIES["distilbert"].config(hf) == dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        hidden_act="relu", hidden_dropout_prob=0.11, attention_probs_dropout_prob=0.12, max_position_embeddings=40,
        type_vocab_size=0, initializer_range=0.031, layer_norm_eps=1e-12, classifier_dropout=0.14,
        pooler_hidden_act="relu", pad_token_id=2, tie_word_embeddings=True, **LABELS)
    hf = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_inner=None, n_positions=40,
                                 activation_function="relu", resid_pdrop=0.11, embd_pdrop=0.11, attn_pdrop=0.12,
                                 initializer_range=0.031, layer_norm_epsilon=1e-7, pad_token_id=2, bos_token_id=5,
                                 eos_token_id=6)
    assert FAMILIES["gpt2"].config(hf) == dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        hidden_act="relu", hidden_dropout_prob=0.11, attention_probs_dropout_prob=0.12, max_position_embeddings=40,
        type_vocab_size=0, initializer_range=0.031, layer_norm_eps=1e-7, bos_token_id=5, eos_token_id=6,
        tie_word_embeddings=True, **LABELS, is_decoder=True, add_cross_attention=False, pad_token_id=None,
        norm_position="pre", embedding_norm=False, lm_head_type="linear")


@pytest.mark.parametrize("model_type", ["roberta", "electra"])
def test_heads_keep_their_own_gelu_whatever_the_layers_activation(model_type):
    """RoBERTa's and ELECTRA's MLM heads (and ELECTRA's classifier) apply gelu even with ``hidden_act="relu"``."""
    family = FAMILIES[model_type]
    make, _ = BERTS[model_type]
    ids = _ids(rows=2)
    for suffix in ("ForMaskedLM", "ForSequenceClassification"):
        config = make()
        config.is_decoder, config.num_labels, config.problem_type = False, 3, None
        torch.manual_seed(0)
        source = getattr(transformers, family.class_prefix + suffix)(config).double().eval()
        ours = bertode.from_bert(source, solver="euler", steps=1).eval()
        assert (ours(input_ids=ids).logits - source(input_ids=ids).logits).abs().max() <= 1e-10, suffix


def _bert(model_class=transformers.BertModel, **fields):
    torch.manual_seed(0)
    return model_class(transformers.BertConfig(**{**SIZES, **fields})).eval()


def test_conversion_refusals_are_one_line_naming_the_value(tmp_path):
    refusals = [
        (lambda: bertode.from_bert(tmp_path / "empty"), ValueError,
         f"from_bert: {str(tmp_path / 'empty')!r} holds no readable config.json ("),
        (lambda: bertode.from_bert(torch.nn.Linear(2, 2)), TypeError,
         "from_bert(model_or_path=Linear) is not supported; allowed: a transformers BERT-family model "
         "(bert, roberta, "),
        (lambda: bertode.from_bert(_bert(num_hidden_layers=2), weight_tying=True), ValueError,
         "from_bert(weight_tying=True) needs a 1-layer source, got num_hidden_layers=2; allowed: weight_tying=False "
         "for a multi-layer BERT"),
        (lambda: bertode.from_bert(_bert(), num_hidden_layers=2), ValueError,
         "from_bert(num_hidden_layers=2) differs from the source's 1 layers; allowed: the source's count, or "
         "weight_tying=True with a 1-layer source"),
        (lambda: bertode.from_bert(_bert(transformers.BertForSequenceClassification, num_labels=3),
                                   id2label={0: "a", 1: "b"},
                                   label2id={"a": 0, "b": 1}),
         ValueError, "from_bert: size mismatch for classifier.weight: copying a param with shape torch.Size([3, 32])"),
        (lambda: bertode.from_bert(transformers.BertModel(transformers.BertConfig(**SIZES), add_pooling_layer=False)),
         ValueError,
         "from_bert: the source lacks parameters bertode needs: ['pooler.dense.weight', 'pooler.dense.bias']"),
        (lambda: bertode.from_bert(_bert(), core_from="last"), ValueError,
         "from_bert(core_from='last') is invalid; allowed: 'first', 'mean'"),
        (lambda: bertode.from_bert(_bert(), position_scheme="after_padding"), ValueError,
         "from_bert(position_scheme='after_padding') is invalid: the source has 'absolute' position embeddings, which "
         "the converted model would lose; allowed: 'absolute' (the source's)"),
    ]
    (tmp_path / "empty").mkdir()
    for convert, error_class, start in refusals:
        with pytest.raises(error_class) as error:
            convert()
        message = str(error.value)
        assert "\n" not in message and message.startswith(start), message
    extra = _bert()
    extra.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(ValueError, match=r"^from_bert: the source has parameters bertode cannot place: \['extra'\]$"):
        bertode.from_bert(extra)


def test_a_directory_without_architectures_is_a_base_model_and_a_refused_head_loads_no_weights(tmp_path):
    source = _bert()
    source.save_pretrained(tmp_path / "bare")
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "bare" / "config.json").write_text(json.dumps(config))
    ids = _ids(pad=0)
    converted = bertode.from_bert(tmp_path / "bare").eval()
    assert type(converted) is bertode.BertODEModel
    assert (converted(input_ids=ids).last_hidden_state - source(input_ids=ids).last_hidden_state).abs().max() <= 1e-5
    electra = transformers.ElectraForPreTraining(transformers.ElectraConfig(**SIZES, embedding_size=16))
    electra.save_pretrained(tmp_path / "electra")
    (tmp_path / "electra" / "model.safetensors").write_bytes(b"not weights")  # never read: refused before
    with pytest.raises(ValueError, match=r"^from_bert: architecture 'ElectraForPreTraining' is not supported; "
                                         r"allowed: ElectraModel, ElectraForMaskedLM, "):
        bertode.from_bert(tmp_path / "electra")


def test_the_converted_model_takes_the_source_s_dtype_mode_and_frozen_parameters():
    source = _bert().double().train()
    source.embeddings.position_embeddings.weight.requires_grad_(False)  # e.g. DistilBERT's sinusoidal table
    source.encoder.layer[0].output.LayerNorm.bias.requires_grad_(False)
    converted = bertode.from_bert(source)
    assert converted.training and next(converted.parameters()).dtype == torch.float64
    frozen = {name for name, parameter in converted.named_parameters() if not parameter.requires_grad}
    assert frozen == {"embeddings.position_embeddings.weight", "encoder.layer.0.feed_forward.norm.bias"}
    assert not bertode.from_bert(source.eval()).training


def test_a_deq_with_weight_norm_converts_the_source_s_weights_then_reparametrises_them():
    source = _bert()
    deq = bertode.from_bert(source, mode="deq", deq_weight_norm=True)
    assert deq.config.deq_weight_norm
    query = deq.encoder.layer[0].attention.branch.query
    assert hasattr(query, "parametrizations")
    assert (query.weight - source.encoder.layer[0].attention.self.query.weight).abs().max() <= 1e-6


def test_more_refusals_name_the_source_s_scheme_the_tied_core_and_the_first_five_keys(tmp_path):
    roberta = transformers.RobertaModel(transformers.RobertaConfig(**SIZES, pad_token_id=1))
    with pytest.raises(ValueError) as error:
        bertode.from_bert(roberta, position_scheme="absolute")
    assert str(error.value) == ("from_bert(position_scheme='absolute') is invalid: the source has 'after_padding' "
                                "position embeddings, which the converted model would lose; allowed: 'after_padding' "
                                "(the source's)")
    with pytest.raises(ValueError) as error:
        bertode.from_bert(_bert(), weight_tying=True, core_from="mean")
    assert str(error.value) == ("from_bert(core_from='mean') is invalid without a weight-tied core between a prelude "
                                "and a coda; allowed: 'first' (or weight_tying=True with prelude_layers or "
                                "coda_layers)")
    extra = _bert()
    for index in range(7):
        extra.register_parameter(f"extra{index}", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError) as error:
        bertode.from_bert(extra)
    assert str(error.value) == ("from_bert: the source has parameters bertode cannot place: "
                                "['extra0', 'extra1', 'extra2', 'extra3', 'extra4']")
    holed = _bert()
    for name in ("query", "key", "value"):
        setattr(holed.encoder.layer[0].attention.self, name, None)
    with pytest.raises(ValueError) as error:
        bertode.from_bert(holed)
    branch = "encoder.layer.0.attention.branch"
    needed = [f"{branch}.{name}.{kind}" for name in ("query", "key", "value") for kind in ("weight", "bias")]
    assert str(error.value) == f"from_bert: the source lacks parameters bertode needs: {needed[:5]}"
    (tmp_path / "empty").mkdir()
    with pytest.raises((OSError, ValueError)) as loading:
        transformers.AutoConfig.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError) as error:
        bertode.from_bert(tmp_path / "empty")
    assert str(error.value) == (f"from_bert: {str(tmp_path / 'empty')!r} holds no readable config.json "
                                f"({str(loading.value).splitlines()[0]}); allowed: a directory written by "
                                "save_pretrained")


def test_bertode_s_own_parameters_need_no_source_and_a_deq_without_weight_norm_keeps_plain_weights():
    source = _bert()
    ids = _ids(pad=0)
    for fields in (dict(vector_field="time_weights"), dict(block="rk2_gated"), dict(mode="deq")):
        converted = bertode.from_bert(source, **fields)  # time_weights' field, the gate, the DEQ's injection
        query = next(module for name, module in converted.named_modules() if name.endswith("branch.query"))
        assert torch.equal(query.weight, source.encoder.layer[0].attention.self.query.weight), fields
    deq = bertode.from_bert(source, mode="deq", deq_weight_norm=False)
    assert not any(hasattr(module, "parametrizations") for module in deq.modules())
    assert converted(input_ids=ids).last_hidden_state.shape == (3, 7, 32)


def test_a_prelude_without_a_coda_splits_the_stack_and_equals_the_source():
    torch.manual_seed(0)
    source = transformers.BertModel(transformers.BertConfig(**{**SIZES, "num_hidden_layers": 3})).double().eval()
    ours = bertode.from_bert(source, prelude_layers=1, solver="euler", steps=1).double().eval()
    assert len(ours.encoder.prelude) == 1 and len(ours.encoder.core.layer) == 2
    ids = _ids(pad=0)
    assert (ours(input_ids=ids).last_hidden_state - source(input_ids=ids).last_hidden_state).abs().max() <= 1e-10


def test_split_stack_by_default_maps_each_layer_once_and_a_tied_core_takes_the_first_middle_layer():
    from bertode.convert import split_stack

    state = {f"bert.encoder.layer.{i}.w": torch.tensor(float(i)) for i in range(4)}
    state["bert.embeddings.w"] = torch.tensor(-1.0)
    split = SimpleNamespace(prelude_layers=1, coda_layers=1, weight_tying=False)
    assert {key: value.item() for key, value in split_stack(state, 4, split).items()} == {
        "bert.encoder.prelude.0.w": 0.0, "bert.encoder.core.layer.0.w": 1.0, "bert.encoder.core.layer.1.w": 2.0,
        "bert.encoder.coda.0.w": 3.0, "bert.embeddings.w": -1.0}
    tied = SimpleNamespace(prelude_layers=1, coda_layers=1, weight_tying=True)
    assert split_stack(state, 4, tied)["bert.encoder.core.layer.0.w"].item() == 1.0


def test_rename_bert_key_gives_bertode_s_site_names():
    from bertode.convert import rename_bert_key

    assert [rename_bert_key(key) for key in ("bert.encoder.layer.0.attention.self.query.weight",
                                             "encoder.layer.1.attention.output.LayerNorm.bias",
                                             "bert.encoder.layer.2.intermediate.dense.weight",
                                             "bert.encoder.layer.3.output.dense.bias", "cls.predictions.bias")] == [
        "bert.encoder.layer.0.attention.branch.query.weight", "encoder.layer.1.attention.norm.bias",
        "bert.encoder.layer.2.feed_forward.branch.intermediate.weight",
        "bert.encoder.layer.3.feed_forward.branch.dense.bias",
        "cls.predictions.bias"]


def test_a_source_that_names_only_the_decoder_s_bias_converts_with_its_logits():
    torch.manual_seed(0)
    source = transformers.BertForMaskedLM(transformers.BertConfig(**SIZES, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        source.cls.predictions.decoder.bias.normal_()
    source.cls.predictions.bias = None  # an older head layout: the bias lives on the decoder only
    assert "cls.predictions.bias" not in source.state_dict()
    ids = _ids(pad=0)
    ours = bertode.from_bert(source).eval()
    assert (ours(input_ids=ids).logits - source(input_ids=ids).logits).abs().max() <= 1e-5


def test_from_pretrained_on_a_bert_directory_passes_conversion_fields_to_from_bert_and_the_rest_to_the_source(tmp_path):
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(**{**SIZES, "num_hidden_layers": 4})).save_pretrained(tmp_path)
    model = bertode.BertODEForMaskedLM.from_pretrained(tmp_path, dtype=torch.float64, solver="rk4", prelude_layers=1,
                                                       coda_layers=1, weight_tying=True, core_from="mean")
    assert model.config.solver == "rk4" and next(model.parameters()).dtype == torch.float64
    source = transformers.BertForMaskedLM.from_pretrained(tmp_path, dtype=torch.float64)
    middle = [source.bert.encoder.layer[i].attention.self.query.weight for i in (1, 2)]
    assert torch.allclose(model.bert.encoder.core.layer[0].attention.branch.query.weight, (middle[0] + middle[1]) / 2)
    with pytest.raises(ValueError) as error:
        bertode.BertODEForCausalLM.from_pretrained(_save(tmp_path / "roberta"))
    assert str(error.value) == ("BertODEForCausalLM.from_pretrained: a 'roberta' checkpoint has no BertODEForCausalLM "
                                "conversion; allowed: BertODEModel, BertODEForMaskedLM, "
                                "BertODEForSequenceClassification, "
                                "BertODEForTokenClassification, BertODEForQuestionAnswering, BertODEForMultipleChoice")
    bertode.BertODEModel(bertode.BertODEConfig(**SIZES)).save_pretrained(tmp_path / "ours")
    assert type(bertode.BertODEModel.from_pretrained(tmp_path / "ours")) is bertode.BertODEModel  # not converted


def _save(folder):
    transformers.RobertaModel(transformers.RobertaConfig(**SIZES, pad_token_id=1)).save_pretrained(folder)
    return folder


DEBERTA = dict(SIZES, relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=4,
               position_biased_input=False)


def _refusal(convert) -> str:
    with pytest.raises(ValueError) as error:
        convert()
    return str(error.value)


def test_each_family_s_refusal_is_its_whole_line():
    from bertode.families import family_of, supported, target_class

    relative = transformers.BertConfig(**SIZES, position_embedding_type="relative_key")
    assert _refusal(lambda: FAMILIES["bert"].config(relative)) == (
        "from_bert: position_embedding_type='relative_key' (bert) is not supported; allowed: 'absolute'")
    unset = transformers.BertConfig(**SIZES)
    unset.position_embedding_type = None  # an older config: absolute
    assert FAMILIES["bert"].config(unset)["hidden_size"] == 32
    groups = transformers.AlbertConfig(**SIZES, num_hidden_groups=2)
    assert _refusal(lambda: FAMILIES["albert"].config(groups)) == (
        "from_bert: ALBERT with num_hidden_groups=2, inner_group_num=1 is not supported; allowed: 1 and 1 (one shared "
        "layer)")
    assert _refusal(lambda: family_of("t5")) == (
        f"from_bert: model_type='t5' is not supported; allowed: {supported()} (BERT-layer encoders, and GPT-2)")
    assert _refusal(lambda: target_class(FAMILIES["bert"], "GPT2Model")).startswith(  # "Model" after 4 characters
        "from_bert: architecture 'GPT2Model' is not supported; allowed: BertModel, BertForMaskedLM, ")
    gpt2 = dict(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=40)
    for fields, line in ((dict(add_cross_attention=True), "add_cross_attention=True is not supported; allowed: False"),
                         (dict(embd_pdrop=0.2), "embd_pdrop=0.2 is not supported; allowed: 0.1 (resid_pdrop: one "
                                                "hidden dropout)"),
                         (dict(scale_attn_weights=False), "scale_attn_weights=False is not supported; allowed: True")):
        hf = transformers.GPT2Config(**gpt2, **fields)
        assert _refusal(lambda: FAMILIES["gpt2"].config(hf)) == f"from_bert: GPT-2 with {line}", fields


@pytest.mark.parametrize("fields,tail", [
    (dict(relative_attention=False, pos_att_type=[], position_biased_input=False),
     "position_biased_input=False is not supported; allowed: True without relative_attention"),
    (dict(z_steps=2), "z_steps=2 is not supported; allowed: 0 or 1"),
    (dict(conv_kernel_size=1), "conv_kernel_size=1 is not supported; allowed: 0 (no ConvLayer)")])
def test_deberta_refusals_at_their_boundaries(fields, tail):
    hf = transformers.DebertaV2Config(**{**DEBERTA, **fields})
    assert _refusal(lambda: FAMILIES["deberta-v2"].config(hf)) == f"from_bert: DeBERTa-v2 with {tail}"


def test_deberta_fields_read_the_classifier_dropout_the_head_layout_and_v2_s_norm_list():
    def fields(v2=True, **extra):
        hf = (transformers.DebertaV2Config if v2 else transformers.DebertaConfig)(**{**DEBERTA, **extra})
        return FAMILIES["deberta-v2" if v2 else "deberta"].config(hf)

    assert fields(z_steps=1)["classifier_dropout"] is None  # z_steps=1 passes; no cls_dropout: None
    assert fields(cls_dropout=0.14)["classifier_dropout"] == 0.14
    assert fields(legacy=False, tie_word_embeddings=False)["tie_word_embeddings"] is True  # the decoder is tied
    assert fields(legacy=True, tie_word_embeddings=False)["tie_word_embeddings"] is False
    # transformers' DeBERTa-v2 splits norm_rel_ebd at "|"; v1 reads none of the v2 fields
    assert fields(norm_rel_ebd="layer_norm|position")["norm_rel_ebd"] == "layer_norm"
    stray = fields(v2=False, norm_rel_ebd="layer_norm", position_buckets=4, share_att_key=True)
    assert (stray["norm_rel_ebd"], stray["position_buckets"], stray["share_att_key"]) == (None, -1, False)
