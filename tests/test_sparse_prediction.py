"""Sparse prediction (issue 27): heads score only the labelled positions while training, with the same loss and
gradients as the dense heads (the oracle), and the chunked linear cross-entropy (`bertode.layers.losses`) equals
``torch.nn.functional.cross_entropy`` on the full logits without saving them."""

import json

import pytest
import torch
import torch.nn.functional as F

import bertode
from bertode.layers.embeddings import _Predictions, _Transform
from bertode.layers import losses
from bertode.layers.losses import chunk_rows, linear_cross_entropy

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _inputs(n=29, width=16, vocab=53, ignored=3, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64) / width ** 0.5
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[::ignored] = -100
    return [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)], labels


def _relative(ours, theirs) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()


# --- the chunked cross-entropy against torch's, on the full logits ---

@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 7, 29, 64, None])  # 7 does not divide 29; 64 > n: one chunk
def test_chunked_cross_entropy_equals_torch_on_the_full_logits(reduction, chunk):
    (hidden, weight, bias), labels = _inputs()
    loss, logits, kernel = linear_cross_entropy(hidden, weight, bias, labels, reduction, chunk=chunk)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    full = F.linear(hidden, weight, bias)
    expected = F.cross_entropy(full, labels, ignore_index=-100, reduction=reduction)
    assert kernel == ("one_chunk" if chunk is None else "chunked") and loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 1e-6 * abs(expected.item())
    for ours, theirs in zip(grads, torch.autograd.grad(expected, (hidden, weight, bias))):
        assert _relative(ours, theirs) <= 1e-6
    assert _relative(logits, full.detach()) <= 1e-6 and not logits.requires_grad


@pytest.mark.parametrize("n, ignored", [(0, 1), (5, 1)])  # no rows; rows that are all ignored
def test_no_targets_give_torchs_sum_zero_mean_nan_and_zero_gradients(n, ignored):
    (hidden, weight, bias), labels = _inputs(n=n, ignored=ignored)
    for reduction in ("sum", "mean"):
        loss, _, _ = linear_cross_entropy(hidden, weight, bias, labels, reduction, chunk=2)
        expected = F.cross_entropy(F.linear(hidden, weight, bias), labels, reduction=reduction)
        assert torch.equal(loss.isnan(), expected.isnan()) and (expected.isnan() or loss.item() == expected.item() == 0)
        grads = torch.autograd.grad(loss, (hidden, weight, bias))
        for ours, theirs in zip(grads, torch.autograd.grad(expected, (hidden, weight, bias))):
            assert torch.equal(ours, theirs)  # zeros: no target pulls on anything


def test_bf16_inputs_and_autocast_match_the_dense_bf16_path_and_the_float64_loss():
    (hidden, weight, bias), labels = _inputs(n=40, width=32, vocab=120, dtype=torch.bfloat16)
    loss, logits, _ = linear_cross_entropy(hidden, weight, bias, labels, "mean", chunk=16)
    dense = F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)  # what autocast's decoder computes
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert abs(loss.item() - dense.item()) <= 1e-6 * dense.item()  # the same bf16 logits, upcast per chunk
    exact = F.cross_entropy(F.linear(*(t.double() for t in (hidden, weight, bias))), labels)
    assert abs(loss.item() - exact.item()) <= 1e-2 * exact.item()
    for ours, theirs in zip(torch.autograd.grad(loss, (hidden, weight, bias)),
                            torch.autograd.grad(exact, (hidden, weight, bias))):
        assert ours.dtype == torch.bfloat16 and _relative(ours.double(), theirs) <= 2e-2  # bf16's resolution
    # fp32 parameters under autocast: the matmuls in bf16, as nn.Linear under autocast
    (hidden, weight, bias), labels = _inputs(n=40, width=32, vocab=120)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits, _ = linear_cross_entropy(hidden, weight, bias, labels, "sum", chunk=16)
        dense = F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction="sum")
    assert logits.dtype == torch.bfloat16 and abs(loss.item() - dense.item()) <= 1e-6 * dense.item()
    assert torch.autograd.grad(loss, weight)[0].dtype == torch.float32


def test_the_chunked_loss_saves_no_full_logits_for_the_backward():
    (hidden, weight, bias), labels = _inputs(n=256, width=16, vocab=500, ignored=5)

    def saved_bytes(compute):
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            compute()
        return sum(sizes)

    logits_bytes = 256 * 500 * 4
    dense = saved_bytes(lambda: F.cross_entropy(F.linear(hidden, weight, bias), labels))
    chunked = saved_bytes(lambda: linear_cross_entropy(hidden, weight, bias, labels, chunk=32))
    inputs = sum(t.numel() * t.element_size() for t in (hidden, weight, bias, labels))
    assert dense >= logits_bytes  # the oracle: the hooks see torch's saved logits
    assert chunked <= inputs + 256 * 4 + 64 < logits_bytes  # the inputs, one float per row (the logsumexp), scalars


def test_chunk_rule_and_bad_arguments():
    assert chunk_rows(30522) == 274 and chunk_rows(2**24) == 1  # 32 MiB of fp32 logits per chunk, at least a row
    (hidden, weight, bias), labels = _inputs()
    for kwargs, line in [({"reduction": "none"}, "reduction='none' is invalid; allowed: 'sum', 'mean'"),
                         ({"chunk": 0}, "chunk=0 is invalid; allowed: None or an int >= 1"),
                         ({"kernel": "triton"}, "kernel='triton' is invalid; allowed: None, 'chunked', 'one_chunk', "
                          "'liger'")]:
        with pytest.raises(ValueError, match=line.replace("(", r"\(").replace(")", r"\)")):
            linear_cross_entropy(hidden, weight, bias, labels, **kwargs)


# --- the heads: sparse prediction against the dense heads (same weights, same batch) ---

def _batch(rows=3, seq=12, vocab=97, seed=0, keep=0.3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, seq), generator=generator)
    labels = ids.clone()
    labels[torch.rand(rows, seq, generator=generator) > keep] = -100
    labels[0, 1] = ids[0, 1]  # at least one target
    return ids, labels


def _dense_and_sparse(model, **inputs):
    """Loss and gradients of the dense head and of the sparse one, and both outputs (the same dropout masks)."""
    results = []
    for sparse in (False, True):
        torch.manual_seed(5)
        model.config.sparse_prediction = sparse
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results


def _assert_same(dense, sparse):
    (dense_out, dense_grads), (sparse_out, sparse_grads) = dense, sparse
    assert abs(sparse_out.loss.item() - dense_out.loss.item()) <= 1e-6 * abs(dense_out.loss.item())
    assert dense_grads.keys() == sparse_grads.keys() and len(dense_grads) > 5
    for name, grad in dense_grads.items():
        if name.endswith("key.bias"):  # analytically 0 (softmax ignores a shift): fp32 noise in both paths
            assert max(grad.abs().max(), sparse_grads[name].abs().max()) <= 1e-9, name
        else:  # relative to the parameter's largest gradient
            assert _relative(sparse_grads[name], grad) <= 1e-6, name


@pytest.mark.parametrize("kernel", ["one_chunk", "chunked"])
@pytest.mark.parametrize("mode", ["ode", "deq"])
@pytest.mark.parametrize("items", [None, 23.0])
def test_masked_lm_sparse_equals_dense(mode, items, kernel, monkeypatch):
    if kernel == "chunked":  # chunks of 3 rows: the targets no longer fit one chunk
        monkeypatch.setattr(losses, "CHUNK_BYTES", 3 * 4 * TINY["vocab_size"])
    torch.manual_seed(0)
    extra = {"deq_tol": 1e-6, "deq_max_iter": 40, "num_hidden_layers": 1} if mode == "deq" else {}
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**{**TINY, **extra}, mode=mode)).train()
    ids, labels = _batch()
    dense, sparse = _dense_and_sparse(model, input_ids=ids, labels=labels, num_items_in_batch=items)
    _assert_same(dense, sparse)
    chosen = labels != -100
    assert sparse[0].logits.shape == (int(chosen.sum()), TINY["vocab_size"])  # the scored rows, (batch, seq) order
    assert (sparse[0].logits - dense[0].logits[chosen]).abs().max() <= 1e-5
    assert model.cls.predictions.loss_kernel == kernel


def test_masked_lm_penalty_share_follows_num_items_in_batch():
    """An ODE regulariser's penalty P is weighted by the batch's share n / N of num_items_in_batch N in both
    paths: the loss (CE_sum + n P) / N halves exactly when N doubles (with a share of 1 it would not)."""
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**TINY, regularizer="kinetic", regularizer_weight=5.0))
    ids, labels = _batch(seed=3)
    dense, sparse = _dense_and_sparse(model.train(), input_ids=ids, labels=labels, num_items_in_batch=40.0)
    _assert_same(dense, sparse)
    assert sparse[0].solver_stats["kinetic_energy"] > 1e-4  # a penalty there is to weigh
    half = model(input_ids=ids, labels=labels, num_items_in_batch=80.0).loss.item()
    assert abs(sparse[0].loss.item() - 2 * half) <= 1e-6


def test_causal_lm_sparse_equals_dense_with_the_shift():
    torch.manual_seed(0)
    model = bertode.BertODEForCausalLM(bertode.BertODEConfig(**TINY, is_decoder=True)).train()
    ids, labels = _batch(seed=1, keep=0.6)
    labels[:, 1] = -100  # position 0 scores nothing; the last position's logits score nothing either
    dense, sparse = _dense_and_sparse(model, input_ids=ids, labels=labels, num_items_in_batch=31.0)
    _assert_same(dense, sparse)
    chosen = labels[:, 1:] != -100
    assert torch.allclose(sparse[0].logits, dense[0].logits[:, :-1][chosen], atol=1e-5)


def test_token_classification_sparse_equals_dense_with_dropout():
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**TINY, num_labels=5, classifier_dropout=0.3)
    model = bertode.BertODEForTokenClassification(config).train()
    ids, _ = _batch(seed=2)
    labels = torch.randint(0, 5, ids.shape)
    labels[:, ::3] = -100
    dense, sparse = _dense_and_sparse(model, input_ids=ids, labels=labels)  # dropout at every position, then select
    _assert_same(dense, sparse)
    assert sparse[0].logits.shape == (int((labels != -100).sum()), 5)


def test_pretraining_sparse_equals_dense():
    torch.manual_seed(0)
    model = bertode.BertODEForPreTraining(bertode.BertODEConfig(**TINY)).train()
    ids, labels = _batch(seed=4)
    dense, sparse = _dense_and_sparse(model, input_ids=ids, labels=labels, next_sentence_label=torch.tensor([0, 1, 1]))
    _assert_same(dense, sparse)
    assert sparse[0].prediction_logits.shape == (int((labels != -100).sum()), TINY["vocab_size"])


def test_eval_mode_and_no_labels_keep_every_positions_logits():
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**TINY, sparse_prediction=True))
    ids, labels = _batch()
    assert model.eval()(input_ids=ids, labels=labels).logits.shape == (*ids.shape, TINY["vocab_size"])
    assert model.train()(input_ids=ids).logits.shape == (*ids.shape, TINY["vocab_size"])
    assert model(input_ids=ids, labels=labels).logits.shape == (int((labels != -100).sum()), TINY["vocab_size"])


# --- the config: saved, reloaded, refused; on by default in bertode.train and bertode.finetune ---

def test_the_field_is_saved_old_checkpoints_load_false_and_bad_values_are_refused(tmp_path):
    bertode.BertODEForMaskedLM(bertode.BertODEConfig(**TINY, sparse_prediction=True)).save_pretrained(tmp_path)
    assert bertode.BertODEForMaskedLM.from_pretrained(tmp_path).config.sparse_prediction is True
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["sparse_prediction"]  # a checkpoint written before the field
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert bertode.BertODEForMaskedLM.from_pretrained(tmp_path).config.sparse_prediction is False
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=rf"^BertODEConfig.sparse_prediction={bad!r} is invalid; allowed: True or False$"):
            bertode.BertODEConfig(sparse_prediction=bad)


def test_train_and_finetune_turn_it_on_by_default_and_name_the_key_when_refused():
    from bertode.training.cli import compose
    from bertode.training.finetune import _scratch_config
    from bertode.training.run_config import build_model_config

    assert build_model_config(compose("train", []), vocab_size=50).sparse_prediction is True
    assert build_model_config(compose("train", ["model.sparse_prediction=false"]), vocab_size=50).sparse_prediction is False
    assert build_model_config(compose("train", ["model=deq"]), vocab_size=50).sparse_prediction is True
    assert _scratch_config(compose("finetune", []), 50).sparse_prediction is True
    assert _scratch_config(compose("finetune", ["model=bert", "model.sparse_prediction=false"]), 50).sparse_prediction is False
    with pytest.raises(ValueError, match=r"^model.sparse_prediction='maybe' is invalid; allowed: True or False$"):
        build_model_config(compose("train", ["model.sparse_prediction=maybe"]), vocab_size=50)


def test_bertode_train_runs_the_sparse_head_by_default(tmp_path, cache_dir, monkeypatch):
    """Observed in a real run: every training forward's MLM transform sees exactly the step's target rows, and
    the dense head (`_Predictions.forward`) runs only in evaluation."""
    import bertode.modeling
    from bertode.train import compose, train

    targets, rows, dense_training = [], [], []
    original = bertode.modeling.scored_rows

    def counted(hidden, labels, shift=False):
        result = original(hidden, labels, shift)
        targets.append(result[1].numel())
        return result

    def seen(module, args, output):
        if isinstance(module, _Transform) and module.training:
            rows.append(tuple(args[0].shape))
        if isinstance(module, _Predictions) and module.training:
            dense_training.append(tuple(args[0].shape))

    monkeypatch.setattr(bertode.modeling, "scored_rows", counted)
    handle = torch.nn.modules.module.register_module_forward_hook(seen)
    try:
        train(compose([f"data.cache_dir={cache_dir}", "data.seq_len=16", "data.vocab_size=500",
                       "data.max_eval_sequences=4", "trainer.batch_size=4", "trainer.max_steps=3",
                       "trainer.warmup_steps=1", "trainer.log_every=1", "model.hidden_size=32",
                       "model.intermediate_size=64", "model.num_attention_heads=2"]), tmp_path)
    finally:
        handle.remove()
    assert len(rows) == 3 and not dense_training
    assert [shape[0] for shape in rows] == targets and all(len(shape) == 2 and 0 < shape[0] < 4 * 16 for shape in rows)


def test_a_compiled_model_runs_the_sparse_head_eagerly_without_recompiling_per_batch():
    """``trainer=gpu`` compiles the whole model: the target count varies per batch, and the sparse head runs
    outside the graph (`torch.compiler.disable`), so later batches compile nothing new; the loss is eager's."""
    from torch._dynamo.backends.debugging import aot_eager

    from bertode.compile import compile_model

    compiled = []

    def counting(graph, example_inputs):
        compiled.append(graph)
        return aot_eager(graph, example_inputs)

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**{**TINY, "num_hidden_layers": 1}, mode="discrete", sparse_prediction=True)
    model = bertode.BertODEForMaskedLM(config)
    runner = compile_model(model.train(), "model", backend=counting)
    counts = []
    for step, keep in enumerate((0.3, 0.5, 0.2, 0.6)):
        ids, labels = _batch(seed=step, keep=keep)
        loss = runner(input_ids=ids, labels=labels).loss
        assert abs(loss.item() - model(input_ids=ids, labels=labels).loss.item()) <= 1e-6
        counts.append(len(compiled))
    assert len({int((_batch(seed=s, keep=k)[1] != -100).sum()) for s, k in enumerate((0.3, 0.5, 0.2, 0.6))}) == 4
    assert counts[-1] == counts[1] <= 2 * counts[0], counts  # one recompile at most (as dense), then none
    torch._dynamo.reset()


def test_liger_kernel_is_called_with_its_argument_order_and_the_head_records_it(monkeypatch):
    """liger-kernel needs CUDA; its contract (``forward(lin_weight, _input, target, bias)``, a summed loss) is
    played here by torch's cross-entropy, so the glue (argument order, mean, which kernel ran) is checked on CPU."""
    import sys
    import types

    import bertode.layers.losses as losses

    class FakeLiger(torch.nn.Module):
        def __init__(self, ignore_index=-100, reduction="mean"):
            super().__init__()
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, lin_weight, _input, target, bias=None):
            return F.cross_entropy(F.linear(_input, lin_weight, bias), target, ignore_index=self.ignore_index,
                                   reduction=self.reduction)

    fake = types.ModuleType("liger_kernel.transformers")
    fake.LigerFusedLinearCrossEntropyLoss = FakeLiger
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(losses, "liger_available", lambda device: True)
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**TINY)).train()
    ids, labels = _batch()
    dense, sparse = _dense_and_sparse(model, input_ids=ids, labels=labels)
    assert model.cls.predictions.loss_kernel == "liger"
    _assert_same(dense, sparse)
