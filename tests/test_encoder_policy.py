"""The encoder owns what depends on the mode; every head shares one path to its output.

An encoder's forward returns an `EncoderOutput` (states, stats, one weighted penalty, a
skipped flag) and the base model passes it on. With ``deq_on_nonfinite="skip"`` every
head turns a failed DEQ forward into a zero loss and zero logits of the healthy shapes,
and leaves every gradient as it was before the batch; a failed implicit backward rolls
every parameter's gradient back, the head's included."""

import pytest
import torch

import bertode
from bertode.layers.deq import BertDEQEncoder, build_encoder
from bertode.layers.encoder import BertODEEncoder

from conftest import TINY

DEQ = dict(TINY, num_hidden_layers=1, mode="deq", deq_on_nonfinite="skip")
POISON_BACKWARD = {"on": False}


@bertode.register_fixed_point_solver("anderson_nan_when_poisoned")
def anderson_nan_when_poisoned(f, z0, max_iter, tol, stop_mode="rel", damping=1.0, memory=5, name="deq"):
    """Anderson; while ``POISON_BACKWARD["on"]``, on a map that returns NaN (a failing solve)."""
    solve_map = (lambda z: f(z) * float("nan")) if POISON_BACKWARD["on"] else f
    return bertode.get_fixed_point_solver("anderson")(solve_map, z0, max_iter, tol, stop_mode, damping, memory, name)


def _inputs(head, batch):
    """(model inputs with labels, the names of the output's logits) for one head class."""
    rows, seq = batch["input_ids"].shape
    ids = {key: batch[key] for key in ("input_ids", "attention_mask")}
    labels = {
        bertode.BertODEForSequenceClassification: ({"labels": torch.tensor([0, 1])}, ("logits",)),
        bertode.BertODEForTokenClassification: ({"labels": torch.zeros(rows, seq, dtype=torch.long)}, ("logits",)),
        bertode.BertODEForQuestionAnswering: ({"start_positions": torch.tensor([1, 2]),
                                               "end_positions": torch.tensor([3, 4])}, ("start_logits", "end_logits")),
        bertode.BertODEForNextSentencePrediction: ({"labels": torch.tensor([0, 1])}, ("logits",)),
        bertode.BertODEForPreTraining: ({"labels": batch["input_ids"], "next_sentence_label": torch.tensor([0, 1])},
                                        ("prediction_logits", "seq_relationship_logits")),
        bertode.BertODEForMaskedLM: ({"labels": batch["input_ids"]}, ("logits",)),
        bertode.BertODEForCausalLM: ({"labels": batch["input_ids"]}, ("logits",)),
    }
    if head is bertode.BertODEForMultipleChoice:  # (batch, choices=2, seq)
        choices = {key: torch.stack([value, value.flip(0)], 1) for key, value in ids.items()}
        return {**choices, "labels": torch.tensor([0, 1])}, ("logits",)
    extra, names = labels[head]
    return {**ids, **extra}, names


HEADS = [bertode.BertODEForSequenceClassification, bertode.BertODEForTokenClassification,
         bertode.BertODEForQuestionAnswering, bertode.BertODEForMultipleChoice, bertode.BertODEForPreTraining,
         bertode.BertODEForNextSentencePrediction, bertode.BertODEForMaskedLM, bertode.BertODEForCausalLM]


@pytest.mark.parametrize("head", HEADS, ids=lambda head: head.__name__)
def test_every_head_turns_a_failed_deq_forward_into_a_zero_loss_zero_logits_and_unchanged_gradients(head, batch):
    torch.manual_seed(0)
    model = head(bertode.BertODEConfig(**DEQ, is_decoder=head is bertode.BertODEForCausalLM)).train()
    inputs, names = _inputs(head, batch)
    healthy = model(**inputs)
    healthy.loss.backward()  # gradients from before the failing batch
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert before and healthy.loss.item() > 0
    with torch.no_grad():
        model.bert.encoder.layer[0].feed_forward.branch.intermediate.bias[0] = float("nan")
    out = model(**inputs)
    out.loss.backward()
    assert out.loss.item() == 0.0 and model.skipped_batches == 1
    for name in names:
        assert out[name].shape == healthy[name].shape and not out[name].any(), name
    after = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    as_tuple = model(**inputs, return_dict=False)  # HF's tuple: the loss, then each logits tensor
    assert len(as_tuple) == 1 + len(names) and as_tuple[0].item() == 0.0
    assert all(t.shape == healthy[n].shape and not t.any() for t, n in zip(as_tuple[1:], names))
    assert model.skipped_batches == 2


def test_a_failed_implicit_backward_rolls_back_the_heads_gradients_too(batch):
    torch.manual_seed(0)
    model = bertode.BertODEForSequenceClassification(bertode.BertODEConfig(
        **DEQ, deq_backward_solver="anderson_nan_when_poisoned")).train()
    inputs, _ = _inputs(bertode.BertODEForSequenceClassification, batch)
    model(**inputs).loss.backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert "classifier.weight" in before
    out = model(**inputs)
    assert out.loss.item() > 0  # the forward solve is healthy
    POISON_BACKWARD["on"] = True
    try:
        out.loss.backward()
    finally:
        POISON_BACKWARD["on"] = False
    assert model.skipped_batches == 1
    after = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_the_base_model_passes_the_encoders_penalty_and_skip_flag_on(batch):
    torch.manual_seed(0)
    ode = bertode.BertODEModel(bertode.BertODEConfig(**TINY, solver="rk4", steps=1, regularizer="rnode",
                                                     regularizer_weight=0.5)).train()
    out = ode(**batch)
    assert out.skipped is None and ode.encoder.ode_penalty is not None
    assert torch.equal(out.penalty, 0.5 * ode.encoder.ode_penalty)
    deq = bertode.BertODEModel(bertode.BertODEConfig(**DEQ)).train()
    with torch.no_grad():
        deq.encoder.layer[0].feed_forward.branch.intermediate.bias[0] = float("nan")
    out = deq(**batch)
    assert out.skipped is True and not out.last_hidden_state.any() and not out.last_hidden_state.requires_grad
    assert deq.skipped_batches == 1


@pytest.mark.parametrize("mode, kind, integrates, attention", [
    ("ode", BertODEEncoder, True, "first"), ("discrete", BertODEEncoder, False, "first"),
    ("deq", BertDEQEncoder, False, "last")])
def test_build_encoder_picks_the_encoder_of_each_mode(mode, kind, integrates, attention):
    encoder = build_encoder(bertode.BertODEConfig(**TINY, mode=mode))
    assert type(encoder) is kind and encoder.observed_attention == attention
    assert encoder.layer[0].attention.ode == integrates
