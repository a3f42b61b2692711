"""transformers integration: save/load, Auto classes, fill-mask pipeline, from_bert."""

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    pipeline,
)

import bertode
from conftest import TINY, tiny_bert_config, tiny_ode_config

WORDS = "the cat sat on mat dog ran a in house big small red blue".split()


@pytest.fixture
def tokenizer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab += [f"[unused{i}]" for i in range(TINY["vocab_size"] - len(vocab))]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab_file=str(path))


@pytest.mark.parametrize("config", [dict(solver="dopri5", atol=1e-4, rtol=1e-4, vector_field="time_residual"),
                                    dict(block="rk2_gated", weight_tying=True)])
def test_save_load_round_trip_and_auto_classes(tmp_path, batch, config):
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(tiny_ode_config(**config)).eval()
    with torch.no_grad():  # make the neutral-at-init parameters non-trivial, so loading them matters
        for name, p in model.named_parameters():
            if ".field." in name or ".gate." in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "bertode"
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, bertode.BertODEForMaskedLM)
    for key, value in config.items():
        assert getattr(loaded.config, key) == value
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with torch.no_grad():  # same weights; allow fp32 rounding from a different memory layout
        assert (model(**batch).logits - loaded(**batch).logits).abs().max() <= 1e-6
    assert isinstance(AutoModel.from_pretrained(tmp_path), bertode.BertODEModel)


def test_sequence_classification_auto_class(tmp_path, batch):
    model = bertode.BertODEForSequenceClassification(tiny_ode_config(num_labels=3))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    out = loaded(**batch, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.item() > 0


def test_fill_mask_pipeline(tokenizer):
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(tiny_ode_config(solver="rk4", steps=2)).eval()
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    predictions = fill("the cat [MASK] on the mat", top_k=3)
    assert len(predictions) == 3
    assert all(0.0 <= p["score"] <= 1.0 for p in predictions)
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("hf_class, our_class", [
    (BertModel, bertode.BertODEModel),
    (BertForMaskedLM, bertode.BertODEForMaskedLM),
    (BertForSequenceClassification, bertode.BertODEForSequenceClassification),
])
def test_from_bert_converts_each_class_from_an_instance_and_a_directory(tmp_path, batch, hf_class, our_class):
    torch.manual_seed(0)
    hf = hf_class(tiny_bert_config(num_labels=2)).eval()
    hf.save_pretrained(tmp_path)
    for source in (hf, tmp_path, str(tmp_path)):
        ours = bertode.from_bert(source, solver="euler", steps=1).eval()
        assert type(ours) is our_class
        with torch.no_grad():
            expected, got = hf(**batch), ours(**batch)
        key = "last_hidden_state" if hf_class is BertModel else "logits"
        assert (expected[key] - got[key]).abs().max() <= 1e-5


def test_from_bert_refuses_what_it_cannot_convert():
    with pytest.raises(TypeError, match="from_bert"):
        bertode.from_bert(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="weight_tying"):
        bertode.from_bert(BertModel(tiny_bert_config()), weight_tying=True)
    with pytest.raises(ValueError, match="solver='heun3'"):
        bertode.from_bert(BertModel(tiny_bert_config()), solver="heun3")


def test_trainer_with_the_mlm_collator_gives_hf_bert_losses_step_for_step(tmp_path, tokenizer):
    """`transformers.Trainer` + `DataCollatorForLanguageModeling` (accelerate comes with the
    install) on a BertODEForMaskedLM converted from BertForMaskedLM: the same per-step
    losses as on the HF model (Euler-1 is BERT; the collator's masks come from Trainer's seed)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": [2] + torch.randint(5, 5 + len(WORDS), (10,), generator=generator).tolist() + [3]}
            for _ in range(16)]
    torch.manual_seed(0)
    hf = BertForMaskedLM(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ours = bertode.from_bert(hf, solver="euler", steps=1)
    losses = {}
    for name, model in (("hf", hf), ("bertode", ours)):
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=4,
                                 learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", seed=3,
                                 use_cpu=True, disable_tqdm=True)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        trainer.train()
        losses[name] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses["hf"]) == len(losses["bertode"]) == 4
    assert max(abs(a - b) for a, b in zip(losses["hf"], losses["bertode"])) <= 1e-5, losses
