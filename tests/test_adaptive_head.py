"""``lm_head_type="adaptive"`` (issue 25 part 3, "Adaptive softmax"): the head's loss and logits are
`torch.nn.AdaptiveLogSoftmaxWithLoss`'s on the same weights (copied into a torch instance here), on the
dense and the sparse-prediction paths, with -100 labels and ``num_items_in_batch``, for the causal and
the masked LM; the adaptive input embedding is Transformer-XL's (written here from its definition); the
ties hold through save and load; ``logits_to_keep`` and generation read the same log-probabilities."""

import pytest
import torch

import bertode
from bertode.causal_lm import BertODEForCausalLM
from bertode.modeling import BertODEForMaskedLM

VOCAB, CUTOFFS = 120, [10, 40, 90]
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, mode="discrete",
             lm_head_type="adaptive", adaptive_cutoffs=CUTOFFS, adaptive_div_value=2.0)


def _model(cls=BertODEForCausalLM, **overrides):
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**{**SIZES, "is_decoder": cls is BertODEForCausalLM, **overrides})
    model = cls(config)
    with torch.no_grad():  # biases off zero and logits of order 1, so a weight misplaced or mis-scaled shows
        for parameter in model.cls.predictions.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def _torch_softmax(predictions) -> torch.nn.AdaptiveLogSoftmaxWithLoss:
    """A torch instance with the head's weights (its head Linear: the stacked rows; tail projections transposed)."""
    oracle = torch.nn.AdaptiveLogSoftmaxWithLoss(SIZES["hidden_size"], VOCAB, CUTOFFS, div_value=2.0, head_bias=True)
    with torch.no_grad():
        head = predictions.head
        oracle.head.weight.copy_(torch.cat([head.shortlist.weight, head.clusters.weight]))
        oracle.head.bias.copy_(torch.cat([head.shortlist.bias, head.clusters.bias]))
        for ours, theirs in zip(predictions.tail, oracle.tail):
            theirs[0].weight.copy_(ours[0].weight.t())
            theirs[1].weight.copy_(ours[1].weight)
    return oracle


def _batch(shift: bool):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 12), generator=generator)
    ids[0, :4] = torch.tensor([95, 50, 20, 5])  # every cluster
    labels = ids.clone()
    labels[1, 2:7] = -100
    labels[2, 0] = -100
    return ids, labels


def _oracle_losses(model, ids, labels, shift: bool):
    """(mean, sum) of torch's adaptive loss over the targets, from the model's own final hidden states."""
    with torch.no_grad():
        hidden = model.bert(input_ids=ids).last_hidden_state
    oracle = _torch_softmax(model.cls.predictions)
    log_probs = oracle.log_prob(hidden.reshape(-1, hidden.shape[-1]))
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    keep = labels != -100
    output = oracle(hidden[keep], labels[keep])
    return output.loss, -output.output.sum(), log_probs


@pytest.mark.parametrize("cls", [BertODEForCausalLM, BertODEForMaskedLM])
@pytest.mark.parametrize("sparse", [False, True])
def test_loss_equals_torchs_adaptive_softmax_on_the_same_weights(cls, sparse):
    model = _model(cls, sparse_prediction=sparse)
    model.train(sparse)  # sparse prediction runs while training (dropout is 0: the same function)
    shift = cls is BertODEForCausalLM
    ids, labels = _batch(shift)
    mean, total, log_probs = _oracle_losses(model, ids, labels, shift)
    out = model(input_ids=ids, labels=labels)
    assert torch.allclose(out.loss, mean, rtol=1e-6, atol=1e-6), (out.loss, mean)
    items = 25.0
    out_items = model(input_ids=ids, labels=labels, num_items_in_batch=items)
    assert torch.allclose(out_items.loss, total / items, rtol=1e-6, atol=1e-6), (out_items.loss, total / items)
    targets = labels[:, 1:] if shift else labels
    rows = log_probs.reshape(3, 12, VOCAB)[:, :11 if shift else 12].reshape(-1, VOCAB)[targets.reshape(-1) != -100]
    expected = rows if sparse else log_probs.reshape(3, 12, VOCAB)
    assert out.logits.shape == expected.shape
    assert torch.allclose(out.logits, expected, atol=1e-5), (out.logits - expected).abs().max()


def test_gradients_reach_the_tied_weights_as_torchs_loss_sends_them():
    """The tied clusters and projections get the gradient of the embedding's use and the softmax's use together:
    the softmax's part equals torch's module's gradient on the copied weights."""
    model = _model(sparse_prediction=True)
    model.train()
    ids, labels = _batch(True)
    hidden = model.bert(input_ids=ids).last_hidden_state.detach()
    rows, targets = bertode.modeling.scored_rows(hidden, labels, shift=True)
    loss, _ = model.cls.predictions.scored(rows, targets, "mean")
    loss.backward()
    oracle = _torch_softmax(model.cls.predictions)
    oracle(rows, targets).loss.backward()
    predictions = model.cls.predictions
    assert torch.allclose(predictions.tail[1][0].weight.grad, oracle.tail[1][0].weight.grad.t(), atol=1e-6)
    assert torch.allclose(predictions.tail[2][1].weight.grad, oracle.tail[2][1].weight.grad, atol=1e-6)
    stacked = torch.cat([predictions.head.shortlist.weight.grad, predictions.head.clusters.weight.grad])
    assert torch.allclose(stacked, oracle.head.weight.grad, atol=1e-6)


def test_adaptive_embedding_is_transformer_xls():
    """Token t of cluster j (ids [c_j, c_{j+1})) embeds as E_j[t - c_j] P_j^T (cluster 0: no projection)."""
    model = _model()
    embedding = model.bert.embeddings.word_embeddings
    ids = torch.tensor([[0, 9, 10, 39, 40, 89, 90, 119]])
    edges = [0, *CUTOFFS, VOCAB]
    expected = []
    for token in ids[0].tolist():
        j = max(i for i, edge in enumerate(edges[:-1]) if token >= edge)
        vector = embedding.clusters[j].weight[token - edges[j]]
        expected.append(vector if j == 0 else embedding.projections[j - 1].weight @ vector)
    assert torch.allclose(embedding(ids)[0], torch.stack(expected), atol=1e-6)
    assert [c.weight.shape[1] for c in embedding.clusters] == [32, 16, 8, 4]  # hidden // div_value**j


def test_ties_hold_through_save_and_load(tmp_path):
    model = _model()
    embedding, predictions = model.bert.embeddings.word_embeddings, model.cls.predictions
    assert predictions.head.shortlist.weight is embedding.clusters[0].weight
    for i, tail in enumerate(predictions.tail):
        assert tail[0].weight is embedding.projections[i].weight and tail[1].weight is embedding.clusters[i + 1].weight
    model.save_pretrained(tmp_path)
    loaded = BertODEForCausalLM.from_pretrained(tmp_path)
    assert loaded.cls.predictions.tail[2][0].weight is loaded.bert.embeddings.word_embeddings.projections[2].weight
    ids, labels = _batch(True)
    model.eval(), loaded.eval()
    assert torch.equal(model(input_ids=ids, labels=labels).loss, loaded(input_ids=ids, labels=labels).loss)


def test_logits_to_keep_and_generation_read_the_log_probabilities():
    model = _model().eval()
    ids, _ = _batch(True)
    full = model(input_ids=ids).logits
    assert torch.allclose(full.exp().sum(-1), torch.ones(3, 12), atol=1e-5)  # log-probabilities
    assert torch.equal(model(input_ids=ids, logits_to_keep=1).logits[:, -1], full[:, -1])
    generated = model.generate(ids[:, :5], max_new_tokens=3, do_sample=False)
    steps = ids[:, :5]
    for _ in range(3):  # greedy by hand: the argmax of the last log-probabilities, without a cache
        steps = torch.cat([steps, model(input_ids=steps, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, steps)


@pytest.mark.parametrize("overrides, message", [
    ({"adaptive_cutoffs": None}, "adaptive_cutoffs=None is invalid with BertODEConfig.lm_head_type='adaptive'"),
    ({"adaptive_cutoffs": [40, 10]}, "adaptive_cutoffs=[40, 10] is invalid; allowed: a list of increasing integers"),
    ({"adaptive_cutoffs": [10, 120]}, "adaptive_cutoffs=[10, 120] is invalid with BertODEConfig.vocab_size=120"),
    ({"adaptive_div_value": 8.0}, "adaptive_div_value=8.0 is invalid; allowed: a value that leaves the last of 4"),
    ({"embedding_size": 16}, "embedding_size=16 is invalid; allowed: None or hidden_size=32"),
    ({"lm_head_type": "bert"}, "adaptive_cutoffs=[10, 40, 90] is invalid; allowed: None with lm_head_type='bert'"),
])
def test_bad_adaptive_settings_are_one_line(overrides, message):
    with pytest.raises(ValueError) as error:
        bertode.BertODEConfig(**{**SIZES, **overrides})
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_the_head_runs_in_fp32_under_bf16_autocast():
    """torch's module writes cluster log-probabilities into a buffer of its input's dtype: the head turns autocast
    off, so under bf16 its loss and logits are the fp32 oracle's."""
    model = _model()
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(16, SIZES["hidden_size"], generator=generator)
    labels = torch.randint(0, VOCAB, (16,), generator=generator)
    oracle = _torch_softmax(model.cls.predictions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = model.cls.predictions.scored(hidden.bfloat16(), labels, "mean")
    expected = oracle(hidden.bfloat16().float(), labels)
    assert loss.dtype == logits.dtype == torch.float32
    assert torch.allclose(loss, expected.loss, atol=1e-6) and torch.allclose(logits, oracle.log_prob(
        hidden.bfloat16().float()), atol=1e-5)
