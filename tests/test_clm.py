"""``objective=clm`` (issue 15 item 4): next-token training and evaluation over causal
attention, the first-token convention of packed rows, the DEQ with ``qkv`` injection,
exact resume, `bertode.generate`, and the one-line refusals (an MLM-only head asked for
next tokens, a masked LM asked to generate, ``norm_position=middle``)."""

import json
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import bertode
from bertode.training.objective import make_objective
from test_train import compose_train, run_train, small, straight_and_resumed


@pytest.fixture
def restore_logging():
    """Hydra's in-process runs point the root logger at pytest's captured streams, which close
    after the test: put the root logger back, so later tests' warnings do not hit a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_clm_targets_are_the_text_tokens_of_each_row_and_the_loss_is_their_mean_cross_entropy():
    rows = torch.tensor([[2, 10, 1, 12, 13, 3], [2, 20, 21, 22, 23, 3]])  # [CLS] t1..t4 [SEP]; [UNK] (1) is text
    clm = make_objective("clm", tokenizer=None)
    inputs, labels = clm.make_batch(rows, torch.Generator())
    assert torch.equal(inputs, rows)
    assert clm.targets(labels) == 2 * 4  # T - 2 per row: t1..t4, as the unigram baseline's [:, 1:-1]; no [CLS], [SEP]
    logits = torch.randn(2, 6, 30, generator=torch.Generator().manual_seed(0))
    shifted_logits, shifted_labels = clm.aligned(logits, labels)
    assert torch.equal(shifted_labels, torch.tensor([[10, 1, 12, 13, -100], [20, 21, 22, 23, -100]]))
    # The oracle: -log p(t_{i+1} | tokens <= i) for i = 0 ([CLS]) .. T-3, written out.
    expected = torch.stack([-F.log_softmax(logits[b, i], -1)[rows[b, i + 1]] for b in range(2) for i in range(4)]).mean()
    model = bertode.BertODEForCausalLM(bertode.BertODEConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=32,
                                                              is_decoder=True))
    own = model._token_loss(shifted_logits.reshape(-1, 30), shifted_labels.reshape(-1))
    assert abs(own.item() - expected.item()) <= 1e-6
    mlm = make_objective("mlm", type("T", (), {"all_special_ids": [0, 1, 2, 3, 4], "mask_token_id": 4,
                                          "__len__": lambda self: 30})(), 0.5)
    masked, mlm_labels = mlm.make_batch(rows, torch.Generator().manual_seed(1))
    assert mlm.targets(mlm_labels) == int((mlm_labels != -100).sum()) and mlm.aligned(logits, mlm_labels)[0] is logits


def test_train_objective_clm_beats_the_unigram_baseline_and_evaluate_and_generate_agree(tmp_path, cache_dir,
                                                                                         monkeypatch, capsys,
                                                                                         restore_logging):
    result, records = run_train(tmp_path / "run", small(cache_dir, "objective=clm", "trainer.max_steps=600",
                                                        "trainer.batch_size=16", "trainer.lr=3e-3",
                                                        "data.max_eval_sequences=32", "trainer.log_every=200"))
    assert result["eval"]["loss"] < result["unigram_baseline"] - 0.3, result
    assert result["eval"]["target_tokens"] == 32 * (16 - 2)  # every text token of every eval row
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["architectures"] == ["BertODEForCausalLM"] and saved["is_decoder"] is True
    assert "AutoModelForCausalLM" in (final / "README.md").read_text()

    from bertode.evaluate import main as evaluate_main
    from bertode.generate import main as generate_main

    data = [f"data.cache_dir={cache_dir}", "data.seq_len=16", "data.vocab_size=500", "data.max_eval_sequences=32"]
    monkeypatch.setattr(sys, "argv", ["bertode.evaluate", f"checkpoint={final}", *data,
                                      f"hydra.run.dir={tmp_path / 'evaluation'}"])
    evaluate_main()
    evaluation = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert evaluation["objective"] == "clm"
    assert abs(evaluation["loss"] - result["eval"]["loss"]) <= 1e-5  # the training run's own number
    assert abs(evaluation["perplexity"] - math.exp(evaluation["loss"])) <= 1e-6 * evaluation["perplexity"]
    capsys.readouterr()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bertode.generate", f"checkpoint={final}", "prompt=the whale",
                                      "max_new_tokens=6"])
    generate_main()
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = [tokenizer.cls_token_id] + tokenizer("the whale", add_special_tokens=False)["input_ids"]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert printed == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert printed.startswith("the whale") and len(printed) > len("the whale ")  # "##s" may extend the word
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation", "run"]  # generate writes nothing
    for option, expected in (("temperature=0.5", "temperature=0.5 is invalid with do_sample=false"),
                             ("do_sample=true top_p=1.5", "top_p=1.5 is invalid; allowed: a number in (0, 1]"),
                             ("max_new_tokens=600", "max_new_tokens=600 is invalid: the prompt's")):
        _refused(monkeypatch, capsys, generate_main, ["bertode.generate", f"checkpoint={final}", "prompt=the whale",
                                                      *option.split()], expected, tmp_path)


def test_clm_deq_with_qkv_injection_trains_and_resumes_exactly(tmp_path, cache_dir):
    common = small(cache_dir, "objective=clm", "model=deq", "deq.injection=qkv", "trainer.max_steps=6",
                   "trainer.checkpoint_every=3", "model.hidden_dropout_prob=0.1", "deq.jac_reg_weight=0.1")
    straight, resumed = straight_and_resumed(tmp_path, common)
    assert all(math.isfinite(r["loss"]) for r in straight) and straight[-1]["forward_iterations"] >= 1
    for a, b in zip(straight[3:], resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["loss"], b["loss"])
    config = bertode.BertODEConfig.from_pretrained(tmp_path / "straight" / "final")
    assert (config.mode, config.deq_injection, config.is_decoder) == ("deq", "qkv", True)
    mlm = [o for o in common if o != "objective=clm"] + ["trainer.resume=auto", "trainer.max_steps=9"]
    with pytest.raises(SystemExit) as exit_info:  # the same parameters would silently train the other head
        run_train(tmp_path / "interrupted", mlm)
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def mlm_checkpoint(tmp_path_factory):
    from bertode.train import train

    folder, cache = tmp_path_factory.mktemp("mlm"), tmp_path_factory.mktemp("mlm-cache")
    train(compose_train(small(cache)), folder)
    return folder / "final", cache


def _refused(monkeypatch, capsys, main, argv, expected, tmp_path):
    capsys.readouterr()  # what came before
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, (argv, error)
    assert error.count("\n") == 0 and error.startswith("error: ") and expected in error, (argv, error)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, argv  # nothing written


def test_bad_objectives_and_generation_requests_are_refused_in_one_line(tmp_path, monkeypatch, capsys, mlm_checkpoint,
                                                                       restore_logging):
    from bertode.evaluate import main as evaluate_main
    from bertode.generate import main as generate_main
    from bertode.train import main as train_main

    final, cache = mlm_checkpoint
    monkeypatch.chdir(tmp_path)
    data = [f"data.cache_dir={cache}", "data.seq_len=16", "data.vocab_size=500"]
    run = [f"hydra.run.dir={tmp_path / 'run'}", *data]
    cases = [
        (evaluate_main, ["bertode.evaluate", f"checkpoint={final}", "objective=clm", *run],
         f"objective='clm' is invalid for checkpoint='{final}': it was trained with objective='mlm' and causal "
         "attention would ask another model; allowed: objective=mlm or null"),
        (generate_main, ["bertode.generate", f"checkpoint={final}", "prompt=call me"],
         "is invalid for generation: it is BertODEForMaskedLM (bidirectional attention), which cannot generate"),
        (train_main, ["bertode.train", "model.norm_position=middle", *run],
         "model.norm_position='middle' is invalid; allowed: 'post', 'pre'"),
        (train_main, ["bertode.train", "objective=xlm", *run], "objective='xlm' is invalid; allowed: 'clm', 'mlm'"),  # (and any plugin's registered before)
        (train_main, ["bertode.train", "objective=clm", "+model_overrides.is_decoder=false", *run],
         "model_overrides.is_decoder=False is invalid with objective='clm'"),
        (train_main, ["bertode.train", "objective=clm", "model=deq", "model.norm_position=pre", *run],
         "model.norm_position='pre' is invalid with"),
    ]
    for main, argv, expected in cases:
        _refused(monkeypatch, capsys, main, argv, expected, tmp_path)
