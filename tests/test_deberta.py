"""DeBERTa v1 and v2/v3 in, bertode out (`families.py`, `layers/disentangled.py`): from small random HF
configs (hidden 32, 2 layers, 4 heads, vocab 100, fp32, padding in the batch) the converted model at Euler-1
and discrete equals HF's in every output and every parameter gradient (<= 1e-5), from the object and from
a saved directory (gradients: 1e-5 relative to their scale, as tests/test_families.py); the log buckets equal transformers'; unsupported DeBERTa features are refused in one
line (also by ``bertode.finetune``). HF's padded rows are not a function bertode reproduces (DeBERTa's
padded queries see every key, uniformly masked): outputs are compared, and the loss taken, at the
non-padded positions, which padded positions cannot reach in either model."""

import pytest
import torch
import transformers
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

import bertode
from bertode.convert import rename_key
from bertode.families import FAMILIES
from bertode.layers.disentangled import log_buckets
from conftest import file_tree, refused_line

SIZES = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=40, num_labels=3)
# v1: both terms, distances clamped (max_relative_positions=4 < the 9 tokens), no absolute positions, token types.
V1 = dict(relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=4, position_biased_input=False,
          type_vocab_size=2)
# v3's layout: log buckets (6 < the distances), shared keys, a normed table, absolute positions too, no token types,
# the new MLM head.
V2 = dict(relative_attention=True, pos_att_type="p2c|c2p", position_buckets=6, max_relative_positions=16,
          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=True, type_vocab_size=0, legacy=False)
VARIANTS = {"v1": ("deberta", V1), "v2": ("deberta-v2", V2),
            "v1-absolute": ("deberta", dict(type_vocab_size=2)),  # relative_attention=False: BERT's attention
            "v2-c2p-unshared": ("deberta-v2", dict(relative_attention=True, pos_att_type=["c2p"],
                                                   max_relative_positions=5, position_biased_input=False)),
            "v1-embed-proj": ("deberta", {**V1, "embedding_size": 16})}  # embed_proj: bias-free, before the norm
CASES = [(variant, suffix) for variant, (model_type, _) in VARIANTS.items() for suffix in FAMILIES[model_type].heads
         if variant in ("v1", "v2") or suffix == "ForMaskedLM"]
PER_TOKEN = ("last_hidden_state", "logits", "start_logits", "end_logits")


def _source(variant: str, suffix: str):
    model_type, fields = VARIANTS[variant]
    family = FAMILIES[model_type]
    config_class = transformers.DebertaV2Config if model_type == "deberta-v2" else transformers.DebertaConfig
    config = config_class(**{**SIZES, **fields, "num_labels": 2 if suffix == "ForQuestionAnswering" else 3})
    torch.manual_seed(0)
    source = getattr(transformers, family.class_prefix + suffix)(config).eval()
    with torch.no_grad():  # zero biases and unit LayerNorms would hide a misplaced bias or norm
        for parameter in source.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return family, source


def _inputs(source, suffix: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = (2, 3, 9) if suffix == "ForMultipleChoice" else (3, 9)
    ids = torch.randint(1, SIZES["vocab_size"], shape, generator=generator)
    mask = torch.ones(shape, dtype=torch.long)
    ids[1, ..., 6:], mask[1, ..., 6:] = 0, 0  # padding in the second row
    inputs = {"input_ids": ids, "attention_mask": mask}
    if source.config.type_vocab_size:
        inputs["token_type_ids"] = torch.randint(0, source.config.type_vocab_size, shape, generator=generator)
    return inputs


def _compare(source, converted, inputs, family) -> None:
    """Outputs at non-padded positions, and every parameter's gradient of one loss over them, <= 1e-5."""
    generator = torch.Generator().manual_seed(1)
    theirs_out, ours_out = source(**inputs), converted(**inputs)
    real = inputs["attention_mask"].bool().view(-1, inputs["attention_mask"].shape[-1])
    theirs_loss = ours_loss = 0.0
    for name in ("last_hidden_state", "logits", "start_logits", "end_logits"):
        theirs, ours = getattr(theirs_out, name, None), getattr(ours_out, name, None)
        if theirs is None:
            continue
        assert ours is not None and ours.shape == theirs.shape, name
        if name in PER_TOKEN and theirs.dim() >= 2 and theirs.shape[1] == real.shape[1]:
            theirs, ours = theirs[real], ours[real]
        assert (ours - theirs).abs().max().item() <= 1e-5, (name, (ours - theirs).abs().max().item())
        weight = torch.randn(theirs.shape, generator=generator)
        theirs_loss, ours_loss = theirs_loss + (theirs * weight).sum(), ours_loss + (ours * weight).sum()
    theirs_loss.backward()
    ours_loss.backward()
    mine = dict(converted.named_parameters(remove_duplicate=False))
    grads = {name: p.grad for name, p in source.named_parameters() if p.grad is not None}
    invented = (".key.bias", ".pos_key_proj.bias")  # v1 has none: `deberta_state` adds zeros, not HF gradients
    checked = 0
    for name, grad in family.adapt(grads, source.config).items() if family.adapt else grads.items():
        if family.adapt and name.endswith(invented) and name not in grads:
            continue
        ours_grad = mine[rename_key(name, family)].grad
        assert ours_grad is not None, name
        # fp32 sums in another order: 1e-5 relative to the gradient's scale (the tied embeddings' reach ~20)
        bound = 1e-5 * max(1.0, grad.abs().max().item())
        assert (ours_grad - grad).abs().max().item() <= bound, (name, (ours_grad - grad).abs().max().item())
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("variant,suffix", CASES, ids=[f"{v}-{s}" for v, s in CASES])
def test_conversion_equals_hf_in_outputs_and_gradients(tmp_path, variant, suffix):
    family, source = _source(variant, suffix)
    source.save_pretrained(tmp_path)
    inputs = _inputs(source, suffix)
    converted = [bertode.from_bert(source, solver="euler", steps=1), bertode.from_bert(tmp_path, mode="discrete")]
    for model in converted:
        assert type(model) is family.heads[suffix]
        assert model.config.position_scheme == ("absolute" if variant == "v1-absolute" else "deberta")
        source.zero_grad()
        _compare(source, model.eval(), inputs, family)


def test_from_pretrained_on_a_deberta_directory_converts_and_a_converted_model_round_trips(tmp_path):
    family, source = _source("v2", "ForMaskedLM")
    source.save_pretrained(tmp_path / "hf")
    inputs = _inputs(source, "ForMaskedLM")
    real = inputs["attention_mask"].bool()
    expected = source(**inputs).logits[real]
    loaded = bertode.BertODEForMaskedLM.from_pretrained(tmp_path / "hf", solver="euler", steps=1).eval()
    assert (loaded(**inputs).logits[real] - expected).abs().max().item() <= 1e-5
    loaded.save_pretrained(tmp_path / "ours")
    again = bertode.BertODEForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    assert (again(**inputs).logits[real] - expected).abs().max().item() <= 1e-5
    # One table, the encoder's, read by every layer: saved once, and a change to it reaches every layer's scores.
    assert [name for name in again.state_dict() if "rel_embeddings.weight" in name] == ["bert.encoder.rel_embeddings.weight"]
    tables = {id(layer.attention.branch.positions.table) for layer in again.bert.encoder.layer}
    assert tables == {id(again.bert.encoder.rel_embeddings)}


def test_log_buckets_equal_transformers():
    distances = torch.arange(-700, 701)[:, None] - torch.zeros(1, dtype=torch.long)
    for buckets, max_position in ((6, 16), (256, 512), (64, 300), (7, 20), (3, 10)):  # odd: mid = buckets // 2
        assert torch.equal(log_buckets(distances, buckets, max_position),
                           make_log_bucket_position(distances, buckets, max_position).long())


def test_an_ode_of_deberta_attention_trains():
    """The point of the conversion: DeBERTa's attention as the vector field of an rk4 solve."""
    _, source = _source("v2", "ForMaskedLM")
    model = bertode.from_bert(source, solver="rk4", steps=2).train()
    inputs = _inputs(source, "ForMaskedLM")
    labels = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.bert.encoder.rel_embeddings.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


REFUSALS = [  # (model type, HF config field and value, the one line's tail)
    ("deberta-v2", {"conv_kernel_size": 3}, "conv_kernel_size=3 is not supported; allowed: 0 (no ConvLayer)"),
    ("deberta", {"talking_head": True}, "talking_head=True is not supported; allowed: False"),
    ("deberta-v2", {"attention_head_size": 4},
     "attention_head_size=4 is not supported; allowed: hidden_size / num_attention_heads = 8"),
    ("deberta-v2", {"pos_att_type": ["c2p", "p2p"]}, "pos_att_type=['c2p', 'p2p'] is not supported; allowed: a list of "
     "'c2p' and/or 'p2c' (empty without relative_attention)"),
    ("deberta", {"pooler_hidden_size": 16}, "pooler_hidden_size=16 is not supported; allowed: hidden_size=32"),
]


@pytest.mark.parametrize("model_type,fields,tail", REFUSALS, ids=[next(iter(f)) for _, f, _ in REFUSALS])
def test_unsupported_deberta_features_are_refused_in_one_line(tmp_path, model_type, fields, tail):
    family = FAMILIES[model_type]
    config_class = transformers.DebertaV2Config if model_type == "deberta-v2" else transformers.DebertaConfig
    config = config_class(**{**SIZES, **V1, "type_vocab_size": 0, **fields})
    source = getattr(transformers, family.class_prefix + "Model")(config)
    source.save_pretrained(tmp_path)
    name = "DeBERTa-v2" if model_type == "deberta-v2" else "DeBERTa"
    for given in (source, tmp_path):
        with pytest.raises(ValueError) as error:
            bertode.from_bert(given)
        assert str(error.value) == f"from_bert: {name} with {tail}"
    with pytest.raises(ValueError, match=f"^from_bert: {name} with {next(iter(fields))}="):
        bertode.BertODEModel.from_pretrained(tmp_path)


def test_deberta_fields_are_checked_in_one_line():
    with pytest.raises(ValueError, match=r"^BertODEConfig.pos_att_type=\['c2p', 'p2p'\] is invalid; allowed: None "
                                         r"\(both\), or a list of distinct 'c2p', 'p2c'$"):
        bertode.BertODEConfig(position_scheme="deberta", pos_att_type=["c2p", "p2p"])
    # one bucket: buckets // 2 = 0 divides the log buckets (a ZeroDivisionError in the forward, HF's too)
    with pytest.raises(ValueError, match=r"^BertODEConfig.position_buckets=1 is invalid; allowed: -1 or 0 \(no "
                                         r"buckets\), or an integer >= 2$"):
        bertode.BertODEConfig(position_scheme="deberta", position_buckets=1).validate_ode()
    for buckets in (-1, 0, 2):
        bertode.BertODEConfig(position_scheme="deberta", position_buckets=buckets).validate_ode()
    config = bertode.BertODEConfig(position_buckets=256)
    with pytest.raises(ValueError, match=r"^BertODEConfig.position_buckets=256 is invalid; allowed: -1 with "
                                         r"position_scheme='absolute' \(a field of position_scheme='deberta'\)$"):
        config.validate_ode()


@pytest.mark.usefixtures("restore_logging")  # an in-process Hydra run moves the root logger
def test_finetune_refuses_an_unsupported_deberta_checkpoint_in_one_line_and_writes_nothing(tmp_path, capsys):
    from bertode.training.corpus import SPECIAL_TOKENS
    from bertode.training.wordpiece import train_tokenizer

    folder = tmp_path / "deberta"
    config = transformers.DebertaV2Config(**{**SIZES, **V2, "conv_kernel_size": 3})
    transformers.DebertaV2ForSequenceClassification(config).save_pretrained(folder)
    train_tokenizer(["good bad fine"], 40, SPECIAL_TOKENS).save_pretrained(folder)
    before = file_tree(tmp_path)
    error = refused_line(capsys, "finetune", f"hydra.run.dir={tmp_path / 'run'}", f"checkpoint={folder}")
    assert error == (f"error: checkpoint={str(folder)!r} is invalid: DeBERTa-v2 with conv_kernel_size=3 is not "
                     "supported; allowed: 0 (no ConvLayer)")
    assert file_tree(tmp_path) == before


def test_an_adjoint_differentiates_the_shared_table():
    """The table is no attention site's own parameter: an adjoint still returns its gradient (autograd's)."""
    _, source = _source("v2", "ForMaskedLM")
    inputs = _inputs(source, "ForMaskedLM")
    grads = []
    for sensitivity in ("autograd", "adjoint"):
        model = bertode.from_bert(source, solver="rk4", steps=2, sensitivity=sensitivity, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0).double().eval()
        logits = model(**inputs).logits
        (logits[inputs["attention_mask"].bool()] ** 2).mean().backward()
        grads.append(model.bert.encoder.rel_embeddings.weight.grad)
    assert grads[0].abs().max() > 1e-6
    # the adjoint integrates backward with rk4's own error (~4e-6 relative here)
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * grads[0].abs().max()
