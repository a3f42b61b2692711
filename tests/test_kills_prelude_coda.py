"""Kill tests for `bertode/layers/prelude_coda.py` (issue 29's mutation testing), each against an oracle.

* a split decoder (prelude, core, coda; blocks; cross-attention) is the unsplit stack: outputs, hidden states,
  attentions and cross-attentions of every layer (the core's and coda's cross-attentions were lost before),
  the prelude's and coda's records named by their place in the stack;
* the core reads the model's attention implementation (eager attention dropout equal to the unsplit model's);
* a looped core dialled past its layers: every application's attention, then the coda's (written out);
* the dial sees a core's flat, other-dtype or shorter iterate through the coda;
* the core's penalty, skipped batch, rollback, running counters, exit depths and delegated attributes;
* a trajectory without attentions, a fresh encoder's statistics.
"""

from __future__ import annotations

import re

import pytest
import torch

import bertode
from bertode import BertODEConfig, BertODEForMaskedLM, BertODEModel
from bertode.layers.encoder import EncoderOutput, Pass
from bertode.layers.prelude_coda import PreludeCodaEncoder
from bertode.solve.stats import SolverStats
from conftest import TINY
from test_prelude_coda import StubCore

IDS = torch.randint(5, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def build(cls=BertODEModel, seed=0, **fields):
    torch.manual_seed(seed)
    return cls(BertODEConfig(**{**TINY, "initializer_range": 0.3, **fields}))


def split_state(plain, places: dict) -> dict:
    """The unsplit model's weights under the split's names (``places``: layer -> "prelude.0", "core.layer.0", ...)."""
    return {re.sub(r"encoder\.layer\.(\d+)\.", lambda m: f"encoder.{places[int(m[1])]}.", name): value
            for name, value in plain.state_dict().items()}


def test_a_split_decoder_with_blocks_is_the_unsplit_stack_with_every_cross_attention():
    fields = dict(num_hidden_layers=5, mode="discrete", block="rk2", is_decoder=True, add_cross_attention=True)
    plain = build(**fields).eval()
    split = build(**fields, prelude_layers=2, coda_layers=2).eval()
    split.load_state_dict(split_state(plain, {0: "prelude.0", 1: "prelude.1", 2: "core.layer.0", 3: "coda.0",
                                              4: "coda.1"}))
    source = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(2))
    want, got = (model(input_ids=IDS, encoder_hidden_states=source, output_attentions=True,
                       output_hidden_states=True) for model in (plain, split))
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    for name in ("hidden_states", "attentions", "cross_attentions"):
        a, b = getattr(got, name), getattr(want, name)
        assert len(a) == len(b) == (6 if name == "hidden_states" else 5), name
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name
    names = [row["name"] for row in got.solver_stats["layers"]]
    # the prelude's and the coda's blocks are named by their layer in the whole stack (the core numbers its own)
    assert names[:2] == ["layer.0.block", "layer.1.block"] and names[-2:] == ["layer.3.block", "layer.4.block"]
    assert not torch.equal(split(input_ids=IDS).last_hidden_state, got.last_hidden_state)  # the source matters


def test_the_core_reads_the_models_attention_implementation():
    fields = dict(num_hidden_layers=3, mode="discrete", attention_probs_dropout_prob=0.3)
    plain = build(**fields).train()
    split = build(**fields, prelude_layers=1, coda_layers=1).train()
    split.load_state_dict(split_state(plain, {0: "prelude.0", 1: "core.layer.0", 2: "coda.0"}))
    outs = {}
    for implementation in ("eager", "sdpa"):
        for name, model in (("plain", plain), ("split", split)):
            model.config._attn_implementation = implementation  # set after construction
            torch.manual_seed(5)
            outs[name, implementation] = model(input_ids=IDS).last_hidden_state
    assert torch.equal(outs["plain", "eager"], outs["split", "eager"])  # the same dropout draws in every layer
    assert not torch.equal(outs["split", "sdpa"], outs["split", "eager"])  # (SDPA draws its own)


def test_a_looped_core_dialled_past_its_layers_reports_each_application_then_the_coda():
    model = build(num_hidden_layers=6, mode="discrete", weight_tying=True, prelude_layers=1, coda_layers=2).eval()
    with torch.no_grad(), bertode.dialed(depth=5):
        out = model(input_ids=IDS, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 1 + 5 + 2 and len(out.hidden_states) == 1 + 1 + 5 + 2
    for coda, x, probs in zip(model.encoder.coda, out.hidden_states[-3:-1], out.attentions[-2:]):
        branch = coda.attention.branch  # softmax(q k^T / sqrt(d)) per head, written out

        def heads(linear):
            return linear(x).view(2, 7, 4, 8).transpose(1, 2)

        scores = heads(branch.query) @ heads(branch.key).transpose(-1, -2) / 8 ** 0.5
        torch.testing.assert_close(probs, scores.softmax(-1), rtol=0, atol=1e-6)


class FlatCore(StubCore):
    """A user's core whose iterates come flat, in float64, and whose readout reads a shorter window."""

    def forward(self, hidden, attn_mask, output_hidden_states=False):
        from bertode.solve.dial import current_dial

        dial = current_dial()
        dial.on_iterate(1, (hidden * 2).flatten())
        dial.on_iterate(2, (hidden * 3).double())
        self.read = dial.readout(hidden[:, :5])
        return EncoderOutput(hidden * 3, None, SolverStats())


def test_the_dial_sees_a_flat_a_float64_and_a_shorter_iterate_through_the_coda():
    torch.manual_seed(0)
    config = BertODEConfig(**{**TINY, "num_hidden_layers": 4}, prelude_layers=1, coda_layers=1, mode="discrete")
    encoder = PreludeCodaEncoder(config, {"discrete": FlatCore}).eval()
    hidden, seen = torch.randn(2, 10, 32), []
    with torch.no_grad(), bertode.dialed(on_iterate=lambda n, h: seen.append(h), readout=lambda h: h):
        encoder(hidden, None)
        x = encoder.prelude[0](hidden, None, Pass(0))[0]
        coda = [encoder.coda[0](y, None, Pass(3))[0] for y in (x * 2, x * 3, x[:, :5])]
    assert [(h.shape, h.dtype) for h in seen] == [((2, 10, 32), torch.float32)] * 2
    for got, want in zip([*seen, encoder.core.read], coda):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_regularised_core_gives_its_penalty_statistics_and_attributes_to_the_split_model():
    regularised = build(BertODEForMaskedLM, num_hidden_layers=3, mode="ode", solver="rk4", steps=1,
                        prelude_layers=1, coda_layers=1, regularizer="kinetic", regularizer_weight=0.5).train()
    plain = build(BertODEForMaskedLM, num_hidden_layers=3, mode="ode", solver="rk4", steps=1,
                  prelude_layers=1, coda_layers=1).train()
    plain.load_state_dict(regularised.state_dict())
    encoder = regularised.bert.encoder
    assert regularised.solver_stats() == SolverStats().summary()  # a fresh model: no solve yet
    out = regularised(input_ids=IDS, labels=IDS)
    assert encoder.ode_penalty is encoder.core.ode_penalty and encoder.ode_penalty.item() > 1e-3
    torch.testing.assert_close(out.loss - plain(input_ids=IDS, labels=IDS).loss, 0.5 * encoder.ode_penalty,
                               rtol=1e-5, atol=1e-6)
    assert out.solver_stats.summary() == regularised.solver_stats()  # the output's statistics are the forward's
    assert [row["name"] for row in out.solver_stats["layers"]] == ["layer.0.attention", "layer.0.feed_forward"]
    base = regularised.bert(input_ids=IDS)
    torch.testing.assert_close(base.penalty, 0.5 * encoder.ode_penalty, rtol=0, atol=0)


def test_a_deq_core_skips_a_batch_rolls_every_gradient_back_and_counts_it_now():
    model = build(num_hidden_layers=3, mode="deq", prelude_layers=1, coda_layers=1,
                  deq_on_nonfinite="skip").train()
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    out = model(input_ids=IDS).last_hidden_state
    assert model.encoder.last_forward_info is model.encoder.core.last_forward_info is not None
    assert model.solver_stats()["skipped_batches"] == 0
    out.register_hook(lambda grad: grad * float("nan"))
    (out.sum() + model.embeddings.word_embeddings.weight.sum()).backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())  # prelude and coda too
    assert model.solver_stats()["skipped_batches"] == 1  # the core's running counter, read now
    assert model.encoder.counters() == model.encoder.core.counters()
    # a non-finite forward is skipped whole; its statistics are the core's
    skipped = build(BertODEForMaskedLM, num_hidden_layers=3, mode="deq", prelude_layers=1, coda_layers=1,
                    deq_on_nonfinite="skip").train()
    with torch.no_grad():
        skipped.bert.encoder.core.layer[0].feed_forward.branch.intermediate.bias[0] = float("nan")
    result = skipped(input_ids=IDS, labels=IDS)
    assert result.loss.item() == 0.0
    stats = skipped.solver_stats()
    assert stats["skipped_batches"] == 1 and [row["name"] for row in stats["layers"]] == ["deq"]


def test_a_looped_cores_exit_depths_are_the_split_models():
    model = build(BertODEForMaskedLM, num_hidden_layers=4, mode="discrete", weight_tying=True, prelude_layers=1,
                  coda_layers=1).eval()
    with torch.no_grad(), bertode.dialed(depth=4, exit=bertode.make_exit_criterion("kl", 1e9)):
        out = model(input_ids=IDS)
    assert torch.equal(out.solver_stats.exit_depths, torch.ones(2, 7, dtype=torch.long))  # every token after one


@pytest.mark.parametrize("split", [False, True])
def test_a_trajectory_without_attentions_is_the_cores_solves(split):
    fields = dict(num_hidden_layers=3, mode="ode", solver="rk4", steps=2)
    model = build(**fields, **(dict(prelude_layers=1, coda_layers=1) if split else {})).eval()
    with torch.no_grad():
        out = model(input_ids=IDS, output_trajectory=True)
        assert torch.equal(out.last_hidden_state, model(input_ids=IDS).last_hidden_state)
    layers = range(1) if split else range(3)  # the core numbers its one layer 0
    assert [t["name"] for t in out.trajectory] == [f"layer.{i}.{site}" for i in layers
                                                   for site in ("attention", "feed_forward")]
    assert out.attentions is None
