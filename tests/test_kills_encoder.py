"""Kill tests for `bertode/layers/encoder.py` (issue 29's mutation testing), each against an oracle.

* a weight-tied (looped) ODE core applied n times is the untied stack of n copies of its layer: outputs, every
  layer's attentions and cross-attentions, the solves' names, the regularisers' penalty and its gradients (a
  time-dependent field tells the applications' times apart);
* per-token exit waits for the real tokens only (a criterion written here: real tokens leave after one iteration);
* the regularisers' penalty is ``regularizer_weight`` times the integrals and is in the loss; the logged counter
  sums every site's integral;
* a block's record (one step, its evaluations) comes first in its layer's rows; Macaron's first half is a solve;
* a layer built with ``attention_dropout=0.0`` draws no attention dropout at either attention site;
* an encoder config has HF BERT's parameters (no cross-attention site unless ``add_cross_attention``);
* the `Encoder` contract's defaults, a fresh encoder's statistics and counters, ``output_hidden_states``;
* the caching and checkpointing refusals in their whole lines; checkpointing with a segment memory.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertModel

import bertode
from bertode import BertODEConfig, BertODEForMaskedLM, BertODEModel
from bertode.causal_lm import BertODEForCausalLM
from bertode.layers.encoder import BertODEEncoder, BertODELayer, Encoder
from bertode.layers.site import Pass
from bertode.layers.sublayers import CrossMemory
from bertode.solve.exits import ExitCriterion
from bertode.solve.stats import SolverStats
from conftest import TINY, tiny_bert_config

IDS = torch.randint(5, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def build(cls=BertODEModel, seed=0, **fields):
    torch.manual_seed(seed)
    return cls(BertODEConfig(**{**TINY, "initializer_range": 0.3, **fields}))


def untied_copy(tied):
    """The same model with ``weight_tying=False``: every layer a copy of the tied one (the oracle)."""
    applications = tied.config.num_hidden_layers
    untied = type(tied)(BertODEConfig(**{**tied.config.to_dict(), "weight_tying": False})).to(torch.float64)
    prefix = "encoder.layer.0." if isinstance(tied, BertODEModel) else "bert.encoder.layer.0."
    state = {}
    for key, value in tied.state_dict().items():
        for index in range(applications) if key.startswith(prefix) else [None]:
            state[key if index is None else key.replace(prefix, prefix.replace(".0.", f".{index}."))] = value
    untied.load_state_dict(state, strict=True)
    return untied


def names(out):
    return [row["name"] for row in out.solver_stats["layers"]]


# --- the looped core against the untied stack -----------------------------------------------------------------
def test_a_weight_tied_ode_decoder_is_the_untied_stack_of_copies_of_its_layer():
    tied = build(mode="ode", solver="rk4", steps=1, vector_field="time_residual", weight_tying=True,
                 num_hidden_layers=3, is_decoder=True, add_cross_attention=True).double().eval()
    untied = untied_copy(tied).eval()
    source = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    source_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    outs = [model(input_ids=IDS, encoder_hidden_states=source, encoder_attention_mask=source_mask,
                  output_attentions=True, output_hidden_states=True) for model in (tied, untied)]
    a, b = outs
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    for got, want in ((a.hidden_states, b.hidden_states), (a.attentions, b.attentions),
                      (a.cross_attentions, b.cross_attentions)):
        assert len(got) == len(want) and all(torch.equal(x, y) for x, y in zip(got, want))
    assert len(a.hidden_states) == 4 and len(a.cross_attentions) == 3
    assert names(a) == names(b) == [f"layer.{i}.{site}" for i in range(3)
                                    for site in ("attention", "cross_attention", "feed_forward")]
    # the encoder's states matter: without them (no cross-attention site) the output differs
    assert not torch.allclose(tied(input_ids=IDS).last_hidden_state, a.last_hidden_state)


def test_a_weight_tied_regularised_core_has_the_untied_stacks_penalty_and_gradients():
    tied = build(BertODEForMaskedLM, mode="ode", solver="rk4", steps=2, weight_tying=True, num_hidden_layers=2,
                 regularizer="kinetic", regularizer_weight=0.5).double().train()
    untied = untied_copy(tied).train()
    out = []
    for model in (tied, untied):
        result = model(input_ids=IDS, labels=IDS)
        result.loss.backward()
        out.append((result, model.bert.encoder.ode_penalty,
                    model.bert.encoder.layer[0].attention.branch.query.weight.grad))
    (a, penalty_a, grad_a), (b, penalty_b, grad_b) = out
    assert penalty_a.item() > 1e-3
    torch.testing.assert_close(penalty_a, penalty_b, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
    # the tied layer's gradient is the sum of its copies' (each copy's is a part of it)
    copies = sum(layer.attention.branch.query.weight.grad for layer in untied.bert.encoder.layer)
    torch.testing.assert_close(grad_a, copies, rtol=1e-10, atol=1e-12)


def test_the_penalty_is_the_weighted_integrals_in_the_loss_and_the_counter_sums_every_site():
    regularised = build(BertODEForMaskedLM, mode="ode", solver="rk4", steps=2, regularizer="kinetic",
                        regularizer_weight=0.5).double().train()
    plain = build(BertODEForMaskedLM, mode="ode", solver="rk4", steps=2).double().train()
    plain.load_state_dict(regularised.state_dict())
    out = regularised(input_ids=IDS, labels=IDS)
    integrals = regularised.bert.encoder.ode_penalty
    assert integrals is not None and integrals.item() > 1e-3  # four sites, each mean ∫ |f|^2 dt
    assert out.solver_stats["kinetic_energy"] == pytest.approx(integrals.item(), rel=1e-6)  # float32 means
    torch.testing.assert_close(out.loss - plain(input_ids=IDS, labels=IDS).loss, 0.5 * integrals,
                               rtol=1e-12, atol=1e-14)
    base = regularised.bert(input_ids=IDS)
    torch.testing.assert_close(base.penalty, 0.5 * regularised.bert.encoder.ode_penalty, rtol=0, atol=0)


# --- per-token exit waits for the real tokens only ---------------------------------------------------------------
class RealTokensLeave(ExitCriterion):
    """Real tokens leave after their first iteration; padding tokens never would."""

    registry_name = "real_tokens_leave"

    def __init__(self, real: torch.Tensor):
        super().__init__(0.5)
        self.real = real

    def score(self, previous, current):
        return (~self.real).to(current.dtype)


def test_the_looped_core_stops_once_every_real_token_has_exited_whatever_the_padding():
    net = build(BertODEForMaskedLM, mode="discrete", weight_tying=True, core_injection="add",
                num_hidden_layers=4).eval()
    mask = torch.ones_like(IDS)
    mask[1, -3:] = 0
    with torch.no_grad(), bertode.dialed(depth=9, exit=RealTokensLeave(mask.bool())):
        out = net(input_ids=IDS, attention_mask=mask, output_hidden_states=True)
    assert out.solver_stats["depth"] == 1 and len(out.hidden_states) == 2
    assert out.solver_stats["exit_depth_max"] == 1


# --- records: blocks, Macaron, a layer built alone ------------------------------------------------------------------
def test_a_blocks_record_is_one_step_of_its_evaluations_first_in_its_layers_rows():
    out = build(mode="ode", solver="euler", steps=1, block="rk2").eval()(input_ids=IDS)
    rows = out.solver_stats["layers"]
    for index in range(2):
        block, attention, feed_forward = rows[3 * index:3 * index + 3]
        assert block == {"name": f"layer.{index}.block", "nfe_forward": 2, "nfe_backward": 0, "accepted_steps": 1,
                         "rejected_steps": 0, "solves": 1}
        assert attention["name"] == f"layer.{index}.attention" and attention["solves"] == 2  # rk2: two evaluations
        assert feed_forward["name"] == f"layer.{index}.feed_forward" and feed_forward["nfe_forward"] == 2
    assert len(rows) == 6 and out.solver_stats["accepted_steps"] == 2 * (1 + 2 + 2)


def test_macarons_first_half_step_is_a_solve_of_its_own():
    out = build(mode="ode", solver="rk4", steps=1, block="strang").eval()(input_ids=IDS)
    assert names(out) == [f"layer.{i}.{site}" for i in range(2) for site in ("feed_forward_first", "attention",
                                                                             "feed_forward")]
    assert out.solver_stats["nfe_forward"] == 2 * 3 * 4


def test_a_layer_built_alone_integrates_by_default():
    config = BertODEConfig(**TINY, mode="ode", solver="rk4", steps=1)
    torch.manual_seed(0)
    layer = BertODELayer(config).eval()
    x = torch.randn(2, 5, 32)
    out, records = layer(x, None, Pass(3))
    assert [r.name for r in records] == ["layer.3.attention", "layer.3.feed_forward"]
    assert [r.nfe_forward for r in records] == [4, 4]


def test_attention_dropout_zero_turns_off_both_attention_sites_dropout():
    config = BertODEConfig(**{**TINY, "attention_probs_dropout_prob": 0.5}, is_decoder=True,
                           add_cross_attention=True)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    memory = CrossMemory(torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1)), None)

    def draws(**kwargs):
        torch.manual_seed(0)
        layer = BertODELayer(config, integrate=False, **kwargs).train()
        outs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append(layer(x, None, Pass(0, cross=memory))[0])
        return outs

    assert not torch.equal(*draws())  # the config's 0.5 is drawn by default
    assert torch.equal(*draws(attention_dropout=0.0))
    # a DEQ's map is one deterministic function in train mode (its layers are built with attention_dropout=0.0)
    deq = build(mode="deq", attention_probs_dropout_prob=0.5).train()
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outs.append(deq(input_ids=IDS).last_hidden_state)
    assert torch.equal(*outs)


@pytest.mark.parametrize("decoder", [False, True])
def test_an_encoder_has_hf_berts_parameters_and_a_decoder_its_cross_attention(decoder):
    fields = dict(is_decoder=True, add_cross_attention=True) if decoder else {}
    hf = BertModel(tiny_bert_config(**fields))
    ours = build(mode="discrete", **fields)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert all((layer.cross_attention is not None) == decoder for layer in ours.encoder.layer)


# --- the Encoder contract, a fresh encoder, hidden states ------------------------------------------------------------
def test_a_fresh_encoder_has_empty_statistics_no_penalty_and_no_skipped_batch():
    model = build(mode="ode", solver="rk4", steps=1)
    assert model.solver_stats() == SolverStats().summary()
    assert model.encoder.ode_penalty is None and model.skipped_batches == 0
    model(input_ids=IDS)
    assert model.skipped_batches == 0 and model.encoder.ode_penalty is None  # no regulariser
    bare = Encoder()
    assert bare.caching_refusal() is None and bare.checkpointing_refusal() is None
    with bertode.dialed(exit=bertode.make_exit_criterion("latent_diff", 0.1)):
        assert bare.caching_refusal() == "exit='latent_diff' (per-token exit)"


def test_the_encoder_returns_hidden_states_only_when_asked():
    model = build(mode="ode", solver="euler", steps=1).eval()
    assert model(input_ids=IDS).hidden_states is None
    encoder = model.encoder
    hidden = torch.randn(2, 7, 32)
    assert encoder(hidden, None).states is None
    states = encoder(hidden, None, output_hidden_states=True).states
    assert len(states) == 3 and states[0] is hidden


# --- refusals in their whole lines ----------------------------------------------------------------------------------
def test_caching_refusals_of_an_ode_encoder_in_their_whole_lines():
    assert build(is_decoder=True, mem_len=8, position_scheme="transformer_xl").encoder.caching_refusal() == (
        "mem_len=8 (a segment memory; pass the output's mems instead)")
    tied = build(mode="ode", solver="dopri5", weight_tying=True).encoder
    assert tied.caching_refusal() == "solver='dopri5' (adaptive: its step grid depends on the whole sequence)"
    autograd = build(mode="ode", solver="rk4", steps=1).train().encoder
    adjoint = build(mode="ode", solver="rk4", steps=1, sensitivity="adjoint").train().encoder
    with torch.enable_grad():
        assert autograd.caching_refusal() is None
        assert adjoint.caching_refusal() == ("sensitivity='adjoint' with gradients on (its backward re-evaluates "
                                             "attention without the cache)")
    with torch.no_grad():
        assert adjoint.caching_refusal() is None


def test_checkpointing_an_adjoint_is_refused_in_its_whole_line():
    model = build(mode="ode", solver="rk4", steps=1, sensitivity="adjoint")
    with pytest.raises(ValueError) as error:
        model.gradient_checkpointing_enable()
    assert str(error.value) == (
        "gradient_checkpointing_enable() is invalid with sensitivity='adjoint': the adjoint keeps no activations of "
        "the solve (memory is already constant in its steps); allowed: mode='discrete' or mode='ode' with "
        "sensitivity='autograd'")
    assert isinstance(model.encoder, BertODEEncoder)


def test_checkpointed_layers_read_the_segment_memory_as_the_plain_ones():
    torch.manual_seed(0)
    plain = BertODEForCausalLM(BertODEConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        is_decoder=True, position_scheme="transformer_xl", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        max_position_embeddings=64, mem_len=8, initializer_range=0.2, mode="ode", solver="rk4",
        steps=2)).double().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(5))
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)
        with torch.no_grad():
            mems = model(tokens[:, :6]).mems
        out = model(tokens[:, 6:], mems=mems, labels=tokens[:, 6:])
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    torch.manual_seed(3)
    assert not torch.allclose(plain(tokens[:, 6:], labels=tokens[:, 6:]).loss, loss)  # the memory matters
    assert torch.equal(loss, loss_checkpointed) and grads.keys() == grads_checkpointed.keys()
    assert max((grads[n] - grads_checkpointed[n]).abs().max().item() for n in grads) <= 1e-12
