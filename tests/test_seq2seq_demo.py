"""The seq2seq demonstration (issue 26, part 4), small: `scripts/seq2seq_demo.py`'s own functions.

A bertode encoder-decoder (`transformers.EncoderDecoderModel`) with the ODE Transformer's gated RK2
block, trained by `transformers.Trainer`, reverses held-out digit strings; Trainer's loss falls from
the uniform prediction's ln(vocab) below the floor of a decoder blind to its source; greedy and beam
``generate`` give the same tokens (and scores) with the key/value cache as without it.

Run at one torch thread (restored after): the models are too small to share matmuls, and on a busy
2-core machine OpenMP's spin-waits made 2 threads 40x slower."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "seq2seq_demo.py"


def load_script():
    spec = importlib.util.spec_from_file_location("seq2seq_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


demo = load_script()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rk2_gated_encoder_decoder_reverses_held_out_strings():
    """Bound: exact match >= 0.9 on 200 held-out length-5 strings after 100 Trainer steps (it reaches
    1.0 at 80 steps on this seed); a decoder that ignores its encoder scores 10^-5 on average."""
    setting = demo.Setting(min_length=5, max_length=5, steps=100, train_size=6400, eval_size=200)
    train, held_out = demo.splits(setting)
    assert not set(train) & set(held_out)
    model = demo.build_model("rk2_gated", setting)
    demo.train(model, train, setting)
    accuracy = demo.exact_match(model, held_out)
    assert accuracy >= 0.9, f"exact match {accuracy:.3f} < 0.9"


def test_trainer_loss_falls_below_what_a_source_blind_decoder_can_reach():
    """EncoderDecoderModel under Trainer, 40 steps on length-5 strings. The first step's loss is the
    uniform prediction's ln(vocab) (weights start at 0.02 scale) within 0.1. The floor of a decoder that
    reads no source: it can place EOS (1 of the 6 targets) but the digits are independent of each other, so
    (5/6) ln 10 = 1.919 per token; the last 5 steps' mean loss must be 0.3 below it (it is ~1.13)."""
    setting = demo.Setting(min_length=5, max_length=5, steps=40, train_size=2560, eval_size=8, lr=3e-3, warmup=0)
    train, _ = demo.splits(setting)
    losses = demo.train(demo.build_model("rk2_gated", setting), train, setting, log_every=1)
    assert len(losses) == 40
    assert losses[0] == pytest.approx(math.log(demo.VOCAB), abs=0.1)
    source_blind_floor = 5 / 6 * math.log(10)
    assert sum(losses[-5:]) / 5 < source_blind_floor - 0.3, losses


@pytest.fixture(scope="module")
def partly_trained():
    """An rk2_gated model after 60 steps on strings of 3..6 digits: outputs varied and often wrong, so
    beams and greedy paths differ, and sources are padded (the encoder mask matters)."""
    torch.set_num_threads(1)
    setting = demo.Setting(min_length=3, max_length=6, steps=60, train_size=3840, eval_size=12)
    train, held_out = demo.splits(setting)
    model = demo.build_model("rk2_gated", setting)
    demo.train(model, train, setting)
    return model.eval(), demo.collate(demo.Reversal(held_out))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_cache_equals_without(partly_trained, num_beams):
    """Oracle: the same search without the cache (the whole prefix recomputed at every step). Tokens
    identical, every step's scores within 1e-5."""
    model, inputs = partly_trained
    runs = [model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           max_new_tokens=7, do_sample=False, num_beams=num_beams, use_cache=cache,
                           output_scores=True, return_dict_in_generate=True) for cache in (True, False)]
    cached, uncached = runs
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(set(map(tuple, cached.sequences.tolist()))) > 1, "every source gave one output: too weak a check"
    for with_cache, without in zip(cached.scores, uncached.scores):
        finite = torch.isfinite(without)
        assert torch.equal(finite, torch.isfinite(with_cache))
        torch.testing.assert_close(with_cache[finite], without[finite], atol=1e-5, rtol=0)
