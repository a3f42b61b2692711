"""The BERT family in, every head out: for BERT (each head), RoBERTa, XLM-RoBERTa,
CamemBERT, ELECTRA, ALBERT, DistilBERT and GPT-2 built from small random configs, the Euler-1
bertode model converted from the object and from a saved directory equals the HF model
in every output and every parameter gradient (<= 1e-5, fp32); other model types and
architectures are refused in one line; `BertODE*.from_pretrained` on a family directory
converts (never a silently random encoder)."""

import pytest
import torch
import transformers

import bertode
from bertode.convert import rename_key
from bertode.families import FAMILIES

SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=40, num_labels=3)
CONFIGS = {
    "bert": lambda: transformers.BertConfig(**SIZES),
    "roberta": lambda: transformers.RobertaConfig(**SIZES, pad_token_id=1, type_vocab_size=1),
    "xlm-roberta": lambda: transformers.XLMRobertaConfig(**SIZES, pad_token_id=1, type_vocab_size=1),
    "camembert": lambda: transformers.CamembertConfig(**SIZES, pad_token_id=1, type_vocab_size=1),
    "electra": lambda: transformers.ElectraConfig(**SIZES, embedding_size=16),
    "albert": lambda: transformers.AlbertConfig(**SIZES, embedding_size=16),
    "distilbert": lambda: transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                                        max_position_embeddings=40, num_labels=3),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=40),
}
OUTPUTS = ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits", "prediction_logits",
           "seq_relationship_logits")
CASES = [(model_type, suffix) for model_type, family in FAMILIES.items() for suffix in family.heads
         if not model_type.startswith("deberta")]  # DeBERTa's padded rows differ: tests/test_deberta.py


def _inputs(config, suffix, generator):
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    shape = (2, 3, 7) if suffix == "ForMultipleChoice" else (2, 7)
    ids = torch.randint(pad + 1 if pad < 5 else 5, config.vocab_size, shape, generator=generator)
    mask = torch.ones(shape, dtype=torch.long)
    ids[0, ..., -2:], mask[0, ..., -2:] = pad, 0  # padding in the first row
    return {"input_ids": ids, "attention_mask": mask}


def _compare(hf, ours, inputs, family):
    generator = torch.Generator().manual_seed(1)
    hf_out, our_out = hf(**inputs), ours(**inputs)
    compared, hf_loss, our_loss = 0, 0.0, 0.0
    for name in OUTPUTS:
        theirs, mine = getattr(hf_out, name, None), getattr(our_out, name, None)
        if theirs is None:
            continue
        assert mine is not None and mine.shape == theirs.shape, name
        assert (mine - theirs).abs().max().item() <= 1e-5, (name, (mine - theirs).abs().max().item())
        weight = torch.randn(theirs.shape, generator=generator)
        hf_loss, our_loss = hf_loss + (theirs * weight).sum(), our_loss + (mine * weight).sum()
        compared += 1
    assert compared >= 1
    hf_loss.backward()
    our_loss.backward()
    mine = dict(ours.named_parameters(remove_duplicate=False))  # tied weights under every name
    grads = {name: parameter.grad for name, parameter in hf.named_parameters() if parameter.grad is not None}
    checked = 0
    for name, grad in (family.adapt(grads, hf.config) if family.adapt else grads).items():  # GPT-2: Conv1D laid out as Linear
        ours_grad = mine[rename_key(name, family)].grad
        assert ours_grad is not None, name
        # fp32 sums of a different order (GPT-2's addmm): 1e-5 relative to the gradient's scale
        assert (ours_grad - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("model_type,suffix", CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_euler1_conversion_equals_the_source_in_outputs_and_gradients(tmp_path, model_type, suffix):
    family = FAMILIES[model_type]
    torch.manual_seed(0)
    hf_class = getattr(transformers, family.class_prefix + suffix)
    config = CONFIGS[model_type]()
    if suffix in ("ForQuestionAnswering", "ForPreTraining"):
        config.num_labels = 2  # start and end; ALBERT's sentence-order head
    if suffix == "LMHeadModel":
        config.is_decoder = True  # causal attention (bertode refuses a bidirectional causal LM)
    source = hf_class(config).eval()
    source.save_pretrained(tmp_path)
    inputs = _inputs(source.config, suffix, torch.Generator().manual_seed(0))
    for converted in (bertode.from_bert(source, solver="euler", steps=1),
                      bertode.from_bert(tmp_path, solver="euler", steps=1)):
        assert type(converted) is family.heads[suffix]
        source.zero_grad()
        _compare(source, converted.eval(), inputs, family)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "albert", "distilbert"])
def test_from_pretrained_on_a_family_directory_converts(tmp_path, model_type):
    family = FAMILIES[model_type]
    torch.manual_seed(0)
    source = getattr(transformers, family.class_prefix + "ForMaskedLM")(CONFIGS[model_type]()).eval()
    source.save_pretrained(tmp_path)
    inputs = _inputs(source.config, "ForMaskedLM", torch.Generator().manual_seed(0))
    loaded = bertode.BertODEForMaskedLM.from_pretrained(tmp_path).eval()
    assert (loaded(**inputs).logits - source(**inputs).logits).abs().max().item() <= 1e-5
    layers = {"num_hidden_layers": 1} if model_type == "albert" else {}  # ALBERT: a DEQ of its one shared layer
    deq = bertode.BertODEForMaskedLM.from_pretrained(tmp_path, mode="deq", **layers)  # config overrides pass through
    assert deq.config.mode == "deq"


def test_other_model_types_and_architectures_are_refused_in_one_line(tmp_path):
    supported = ("allowed: 'bert', 'roberta', 'xlm-roberta', 'camembert', 'electra', 'albert', 'distilbert', 'gpt2', "
                 "'deberta', 'deberta-v2'")
    sources = {
        "llama": transformers.LlamaModel(transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                                  num_attention_heads=4, intermediate_size=48)),
        "t5": transformers.T5EncoderModel(transformers.T5Config(vocab_size=64, d_model=32, num_layers=1, num_heads=4,
                                                                d_kv=8, d_ff=48)),
    }
    for model_type, source in sources.items():
        folder = tmp_path / model_type
        source.save_pretrained(folder)
        for given in (source, folder):
            with pytest.raises(ValueError) as error:
                bertode.from_bert(given)
            message = str(error.value)
            assert "\n" not in message and f"model_type={model_type!r} is not supported" in message
            assert supported in message
        with pytest.raises(ValueError, match=f"model_type={model_type!r} is not supported"):
            bertode.BertODEForMaskedLM.from_pretrained(folder)
    electra = transformers.ElectraForPreTraining(CONFIGS["electra"]())
    with pytest.raises(ValueError, match="architecture 'ElectraForPreTraining' is not supported; allowed: ElectraModel"):
        bertode.from_bert(electra)
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        bertode.from_bert(transformers.BertModel(transformers.BertConfig(**SIZES, position_embedding_type="relative_key")))


def test_every_head_trains_and_round_trips_through_the_auto_classes(tmp_path):
    config = bertode.BertODEConfig(**SIZES, solver="rk4", steps=2)
    qa_config = bertode.BertODEConfig(**{**SIZES, "num_labels": 2}, solver="rk4", steps=2)
    generator = torch.Generator().manual_seed(0)
    autos = {bertode.BertODEForPreTraining: transformers.AutoModelForPreTraining,
             bertode.BertODEForNextSentencePrediction: transformers.AutoModelForNextSentencePrediction,
             bertode.BertODEForTokenClassification: transformers.AutoModelForTokenClassification,
             bertode.BertODEForQuestionAnswering: transformers.AutoModelForQuestionAnswering,
             bertode.BertODEForMultipleChoice: transformers.AutoModelForMultipleChoice}
    for model_class, auto in autos.items():
        torch.manual_seed(0)
        model = model_class(qa_config if model_class is bertode.BertODEForQuestionAnswering else config)
        suffix = "ForMultipleChoice" if model_class is bertode.BertODEForMultipleChoice else ""
        inputs = _inputs(config, suffix, generator)
        rows = inputs["input_ids"].shape[0]
        labels = {
            bertode.BertODEForPreTraining: {"labels": torch.randint(0, 64, inputs["input_ids"].shape, generator=generator),
                                            "next_sentence_label": torch.tensor([0, 1])},
            bertode.BertODEForNextSentencePrediction: {"labels": torch.tensor([0, 1])},
            bertode.BertODEForTokenClassification: {"labels": torch.randint(0, 3, inputs["input_ids"].shape, generator=generator)},
            bertode.BertODEForQuestionAnswering: {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 9])},
            bertode.BertODEForMultipleChoice: {"labels": torch.randint(0, 3, (rows,), generator=generator)},
        }[model_class]
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(6):
            loss = model(**inputs, **labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (model_class.__name__, losses)
        model.save_pretrained(tmp_path / model_class.__name__)
        loaded = auto.from_pretrained(tmp_path / model_class.__name__)
        assert type(loaded) is model_class
        model.eval(), loaded.eval()
        first = next(v for k, v in model(**inputs).items() if k != "solver_stats")
        again = next(v for k, v in loaded(**inputs).items() if k != "solver_stats")
        assert (first - again).abs().max().item() <= 1e-6, model_class.__name__


def test_pretraining_loss_equals_hf_bert_for_pretraining():
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(CONFIGS["bert"]()).eval()
    ours = bertode.from_bert(hf, solver="euler", steps=1).eval()
    inputs = _inputs(hf.config, "", torch.Generator().manual_seed(2))
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 1:4] = inputs["input_ids"][:, 1:4]
    batch = dict(inputs, labels=labels, next_sentence_label=torch.tensor([1, 0]))
    assert abs(ours(**batch).loss.item() - hf(**batch).loss.item()) <= 1e-6


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "albert", "distilbert"])
def test_untied_output_embeddings_convert_exactly(tmp_path, model_type):
    family = FAMILIES[model_type]
    torch.manual_seed(0)
    config = CONFIGS[model_type]()
    config.tie_word_embeddings = False
    source = getattr(transformers, family.class_prefix + "ForMaskedLM")(config).eval()
    with torch.no_grad():
        source.get_output_embeddings().weight.add_(0.5)  # truly different from the input embeddings
        source.get_output_embeddings().bias.add_(0.25)
    source.save_pretrained(tmp_path)
    inputs = _inputs(source.config, "ForMaskedLM", torch.Generator().manual_seed(0))
    for converted in (bertode.from_bert(source), bertode.from_bert(tmp_path)):
        assert (converted.eval()(**inputs).logits - source(**inputs).logits).abs().max().item() <= 1e-5
