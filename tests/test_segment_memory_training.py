"""Training and evaluating with a segment memory (`bertode/training/segments.py`): the text read in order per batch
row at any world size, the stream loss equal to the whole text's, a resume that continues the memory, evaluation at
another ``mem_len``, and one-line refusals before anything is written."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch

from bertode import BertODEConfig
from bertode.causal_lm import BertODEForCausalLM
from bertode.training.lm import evaluate
from bertode.training.objective import make_objective
from bertode.training.segments import MemoryCarry, SegmentOrder, ordered_eval_batches
from conftest import file_tree, refused_line
from test_train import run_train, small, straight_and_resumed

MEMORY = ["objective=clm", "model.position_scheme=transformer_xl", "model.mem_len=24"]


class _Tokenizer:
    cls_token_id, sep_token_id, pad_token_id, mask_token_id = 0, 1, 2, 3


def test_each_batch_row_reads_the_next_row_of_its_own_slice_at_any_world_size():
    rows = torch.arange(22)[:, None].expand(22, 4)  # row i holds the value i
    order = SegmentOrder(rows, micro_batch=4, seed=0)
    assert order.length == 5  # 22 rows in 4 slices of 5 (2 left over)
    first = [order.micro_batch_rows(m)[:, 0].tolist() for m in range(6)]
    assert first[:2] == [[0, 5, 10, 15], [1, 6, 11, 16]] and first[5] == first[0]  # wraps to the slices' start
    assert [order.starts_over(m) for m in range(6)] == [True, False, False, False, False, True]
    keep = lambda rows, generator: (rows.clone(), rows.clone())  # noqa: E731
    for world in (2, 4):
        for m in range(3):
            alone = order.local_batch(m, keep)[0]
            parts = [SegmentOrder(rows, 4, 0, rank, world).local_batch(m, keep)[0] for rank in range(world)]
            assert all(torch.equal(parts[rank], alone[rank::world]) for rank in range(world))


def test_a_checkpointed_memory_is_every_global_row_in_order_and_each_rank_takes_its_own():
    class TwoRanks:  # dist.gather as torch.distributed would give it: every rank's value, in rank order
        def __init__(self, carries):
            self.carries = carries

        def gather(self, value):
            return [{"rows": c.own_rows.tolist(), "mems": [m.cpu() for m in c.mems]} for c in self.carries]

    memory = [torch.randn(4, 3, 8), torch.randn(4, 3, 8)]  # 4 global rows, 2 layers
    carries = [MemoryCarry(torch.arange(4)[rank::2]) for rank in range(2)]
    for carry in carries:
        carry.mems = tuple(m[carry.own_rows] for m in memory)
    state = carries[0].state(TwoRanks(carries))
    assert all(torch.equal(saved, whole) for saved, whole in zip(state["mems"], memory))
    alone = MemoryCarry(torch.arange(4))
    alone.load(state, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(alone.mems, memory))
    odd = MemoryCarry(torch.arange(4)[1::2])
    odd.load(state, "cpu")
    assert torch.equal(odd.mems[1], memory[1][1::2])


def test_the_ordered_evaluation_is_the_loss_of_each_slice_read_as_one_text():
    """A discrete model with a memory longer than the text: evaluating the rows in order with the memory carried
    scores every target as the causal forward of the whole slice does (the mean over all targets)."""
    torch.manual_seed(0)
    config = BertODEConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, mode="discrete", is_decoder=True, position_scheme="transformer_xl",
                           mem_len=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           initializer_range=0.3)
    model = BertODEForCausalLM(config).double()
    rows = torch.randint(4, 40, (7, 8), generator=torch.Generator().manual_seed(1))
    rows[:, 0], rows[:, -1] = 0, 1  # [CLS] ... [SEP] as packed rows are
    objective = make_objective("clm", _Tokenizer(), 0.15)
    batches = ordered_eval_batches(rows, objective, seed=0, batch_size=3)  # 3 slices of 2 rows; row 6 left out
    assert len(batches) == 2 and [b[0][:, 1].tolist() for b in batches] == [rows[[0, 2, 4], 1].tolist(),
                                                                              rows[[1, 3, 5], 1].tolist()]
    result = evaluate(model, batches, objective, torch.device("cpu"))
    model.config.mem_len = 0
    total, count = 0.0, 0
    for start in (0, 2, 4):
        text = rows[start:start + 2].reshape(1, -1)
        labels = text.clone()
        labels[(text == 0) | (text == 1)] = -100  # [CLS] and [SEP] are never targets
        logits = model(text).logits[0, :-1]
        targets = labels[0, 1:]
        kept = targets != -100
        total += torch.nn.functional.cross_entropy(logits[kept], targets[kept], reduction="sum").item()
        count += int(kept.sum())
    assert result["target_tokens"] == count
    assert abs(result["loss"] - total / count) <= 1e-5  # evaluate sums the cross-entropy in float32


@pytest.mark.parametrize("model", ["ode", "deq"])
def test_resume_with_a_memory_reproduces_the_uninterrupted_losses(tmp_path, cache_dir, model):
    extra = ["deq.max_iter=12"] if model == "deq" else []
    common = small(cache_dir, *MEMORY, f"model={model}", *extra, "trainer.max_steps=6", "trainer.checkpoint_every=3",
                   "model.hidden_dropout_prob=0.1")
    straight, resumed = straight_and_resumed(tmp_path, common)
    for a, b in zip(straight[3:], resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["loss"], b["loss"])
    state = torch.load(tmp_path / "straight" / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    assert [tuple(m.shape) for m in state["memory"]["mems"]] == [(4, 24, 32)] * 2  # mem_len 24 > seq_len 16: carried


def test_evaluation_runs_at_another_memory_length_and_a_longer_memory_reads_more(tmp_path, cache_dir, capsys):
    """bertode.evaluate at model.mem_len 0, 16 and 64; the training run's own final evaluation at
    trainer.eval_mem_len=64 is the same number as bertode.evaluate's at 64."""
    from conftest import run_command

    trained, _ = run_train(tmp_path / "run", small(cache_dir, *MEMORY, "model=bert", "data.max_eval_sequences=12",
                                                   "trainer.max_steps=20", "trainer.lr=3e-3",
                                                   "trainer.eval_mem_len=64"))
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["mem_len"] == 24  # the training memory is saved
    losses = {}
    for mem_len in (0, 16, 64):
        out = tmp_path / f"eval{mem_len}"
        code = run_command("evaluate", [f"checkpoint={final}", f"model.mem_len={mem_len}", f"data.cache_dir={cache_dir}",
                                        "data.seq_len=16", "data.vocab_size=500", "max_sequences=12", "batch_size=4",
                                        f"hydra.run.dir={out}"])
        assert code == 0, capsys.readouterr().err[-2000:]
        result = json.loads((out / "evaluation.json").read_text())
        assert result["overrides"] == {"mem_len": mem_len} and math.isfinite(result["loss"])
        losses[mem_len] = result["loss"]
    assert losses[0] != losses[16] != losses[64]  # the memory is read (its effect on the loss is measured, not assumed)
    assert abs(trained["eval"]["loss"] - losses[64]) <= 1e-6


def test_memory_settings_a_run_cannot_use_are_refused_before_anything_is_written(tmp_path, cache_dir, capsys,
                                                                                 restore_logging):
    run = tmp_path / "run"
    before = file_tree(run, cache_dir)
    common = [f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}"]
    cases = {
        "model.mem_len=8 is invalid with is_decoder=False": ["model.mem_len=8", "model.position_scheme=rotary"],
        "model.mem_len=-1 is invalid; allowed: an integer >= 0": ["objective=clm", "model.mem_len=-1"],
        "model.mem_len=8 is invalid with position_scheme='absolute'": ["objective=clm", "model.mem_len=8"],
        "data.streaming=true is invalid with model.mem_len=8": MEMORY[:2] + ["model.mem_len=8", "data.streaming=true"],
        "trainer.eval_mem_len=64 is invalid with model.mem_len=0": MEMORY[:2] + ["trainer.eval_mem_len=64"],
    }
    for expected, argv in cases.items():
        assert expected in refused_line(capsys, "train", *common, *argv)
    assert file_tree(run, cache_dir) == before


def test_the_deq_transformer_recipe_carries_the_papers_memory_positions_vocabulary_and_softmax():
    from bertode.training.run_config import build_model_config
    from test_train import compose_train

    cfg = compose_train(["experiment=deq_transformer_wt103"])
    config = build_model_config(cfg, vocab_size=267_735)
    assert (config.position_scheme, config.mem_len, cfg.trainer.eval_mem_len) == ("transformer_xl", 150, 480)
    assert (config.lm_head_type, config.adaptive_cutoffs, config.adaptive_div_value) == ("adaptive",
                                                                                          [20000, 40000, 200000], 4.0)
    assert (cfg.data.vocabulary, cfg.data.vocab_size, cfg.data.seq_len - 2) == ("word", None, 150)
    assert (config.mode, config.deq_injection, config.is_decoder) == ("deq", "qkv", True)
    assert (cfg.depth.low, cfg.depth.high, config.deq_max_iter) == (10, 12, 12)  # f_thres 12 + U(-2, 0)


def test_two_processes_read_the_same_text_and_save_the_same_memory_as_one(tmp_path, cache_dir):
    """torchrun with 2 ranks: each global row reads the same text and keeps the same memory as in one process, so
    the losses and the checkpointed memory (gathered from both ranks) are one process's."""
    from test_train import _losses, _python

    overrides = small(cache_dir, *MEMORY, "trainer.device=cpu", "model=ode", "solver=rk4", "trainer.max_steps=6",
                      "trainer.checkpoint_every=3", "trainer.eval_every=1000", "model.hidden_dropout_prob=0.1")
    one = _python("-m", "bertode.train", f"hydra.run.dir={tmp_path / 'one'}", *overrides, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    with socket.socket() as probe:  # a free port: other files' torchrun tests may run at the same time (xdist)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    two = _python("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "bertode.train",
                  f"hydra.run.dir={tmp_path / 'two'}", *overrides, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
    saved = [torch.load(run / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)["memory"]["mems"]
             for run in (tmp_path / "one", tmp_path / "two")]
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(*saved))
