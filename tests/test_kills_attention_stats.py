"""Oracle tests that kill mutants of the attention sublayers and their masks (`layers/sublayers.py`) and of the
solver statistics, observer and host-sync counter (`solve/stats.py`, `observe.py`, `host_syncs.py`) (issue 29).

Oracles: masks written out element by element; softmax(q k^T / sqrt(d) + mask) v written out in float64; HF's
``BertSelfAttention`` (eager and sdpa); counts in closed form for fixed-step solvers; sums written out."""

import math
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.bert.modeling_bert import BertAttention

import bertode
from bertode.layers import sublayers
from bertode.layers.dropout import split_invariant
from bertode.layers.loop import ActiveTokens
from bertode.layers.sublayers import AttentionBranch, CrossAttentionBranch, CrossMemory, FeedForwardBranch
from bertode.layers.sublayers import eager_attention, sdpa_mask
from bertode.solve import observe
from bertode.solve.host_syncs import HostSyncs, count_host_syncs, sync_op_name
from bertode.solve.observe import Observer
from bertode.solve.stats import FixedPointRecord, SolveRecord, SolverStats, on_host
from conftest import projection_loss, tiny_bert_config, tiny_ode_config

MIN64 = torch.finfo(torch.float64).min


# --- sdpa_mask against masks written out ------------------------------------------------------------------------
def written_mask(padding, causal: bool, past: int, queries: int, batch: int = 1) -> torch.Tensor:
    """(batch, 1, queries, keys): query i sees key j if j <= past + i (causal) and j is not padding; a query with
    no key left sees itself."""
    keys = past + queries
    out = torch.zeros(batch, 1, queries, keys, dtype=torch.bool)
    for b in range(batch):
        for i in range(queries):
            for j in range(keys):
                out[b, 0, i, j] = (not causal or j <= past + i) and (padding is None or bool(padding[b, j]))
            if not out[b, 0, i].any():
                out[b, 0, i, past + i] = True
    return out


def test_the_padding_mask_is_the_keys_to_attend_as_booleans_and_none_when_all_attend():
    padding = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    mask = sdpa_mask(padding)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 1, 4)
    assert torch.equal(mask[:, 0, 0], padding.bool())
    assert sdpa_mask(torch.ones(2, 4, dtype=torch.long)) is None and sdpa_mask(None) is None


@pytest.mark.parametrize("past", [0, 2])
def test_the_causal_mask_with_padding_equals_the_written_out_rule(past):
    queries = 4
    padding = torch.ones(3, past + queries, dtype=torch.long)
    padding[0, 0] = 0  # left padding: the first query has no key left and sees itself
    padding[1, -1] = 0  # right padding
    padding[2, :2] = 0
    mask = sdpa_mask(padding, causal=True, past=past)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, written_mask(padding, True, past, queries, batch=3))


@pytest.mark.parametrize("past", [0, 3])
def test_the_causal_mask_without_padding_is_the_lower_triangle_shifted_by_the_past(past):
    mask = sdpa_mask(None, causal=True, length=4, device=torch.device("cpu"), past=past)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 4, past + 4)
    assert torch.equal(mask, written_mask(None, True, past, 4))
    ones = sdpa_mask(torch.ones(2, past + 4, dtype=torch.long), causal=True, past=past)  # all ones: no padding term
    assert torch.equal(ones, written_mask(None, True, past, 4))
    assert torch.equal(sdpa_mask(None, causal=True, length=4), written_mask(None, True, 0, 4))  # past defaults to 0


def test_one_new_query_sees_every_key_so_its_causal_mask_is_none_unless_padded():
    assert sdpa_mask(None, causal=True, length=1, past=5) is None
    assert sdpa_mask(torch.ones(2, 6, dtype=torch.long), causal=True, past=5) is None
    padding = torch.tensor([[0, 1, 1, 1, 1, 1]])
    assert torch.equal(sdpa_mask(padding, causal=True, past=5), written_mask(padding, True, 5, 1))


# --- eager_attention and SDPA against softmax written out in float64 -----------------------------------------------
def written_attention(q, k, v, additive=None):
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if additive is not None:
        scores = scores + additive
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v), probs


def qkv(batch=2, heads=2, queries=3, keys=5, size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, size, generator=generator, dtype=torch.float64)
            for n in (queries, keys, keys)]


@pytest.mark.parametrize("kind", ["none", "float", "bool"])
def test_eager_attention_is_the_written_out_softmax(kind):
    q, k, v = qkv()
    allowed = torch.rand(2, 1, 3, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    allowed[..., 0] = True
    additive = torch.randn(2, 2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = {"none": None, "float": additive, "bool": allowed}[kind]
    oracle = {"none": None, "float": additive, "bool": torch.where(allowed, 0.0, -torch.inf).double()}[kind]
    context, probs = eager_attention(q, k, v, mask)
    expected_context, expected_probs = written_attention(q, k, v, oracle)
    torch.testing.assert_close(probs, expected_probs, rtol=0, atol=1e-12)
    torch.testing.assert_close(context, expected_context, rtol=0, atol=1e-12)


def test_eager_attention_drops_probabilities_with_the_inverted_scale_and_returns_them_undropped():
    torch.manual_seed(0)
    q, k, _ = qkv(batch=4, heads=4, queries=16, keys=16, size=16)
    v = torch.eye(16, dtype=torch.float64).expand(4, 4, 16, 16)  # context = the kept probabilities themselves
    context, probs = eager_attention(q, k, v, None, dropout_p=0.25)
    expected_probs = written_attention(q, k, v)[1]
    torch.testing.assert_close(probs, expected_probs, rtol=0, atol=1e-12)
    ratio = context / probs
    kept = ratio != 0
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / 0.75), rtol=1e-12, atol=0)
    assert abs(kept.double().mean().item() - 0.75) < 0.03  # 4096 draws


# --- AttentionBranch against HF's BertAttention ----------------------------------------------------------------------
def branch_and_hf(implementation: str, **fields):
    torch.manual_seed(0)
    config = tiny_bert_config(**fields)
    config._attn_implementation = implementation
    hf = BertAttention(config).double().eval()
    branch = AttentionBranch(tiny_ode_config(**fields)).double().eval()
    for name in ("query", "key", "value"):
        getattr(branch, name).load_state_dict(getattr(hf.self, name).state_dict())
    branch.dense.load_state_dict(hf.output.dense.state_dict())
    branch.config._attn_implementation = implementation
    return branch, hf


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_the_attention_branch_is_hf_self_attention_and_its_output_projection(implementation):
    branch, hf = branch_and_hf(implementation)
    hidden = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    padding = torch.ones(2, 6, dtype=torch.long)
    padding[1, 4:] = 0
    additive = (1.0 - padding[:, None, None, :].double()) * MIN64
    context = hf.self(hidden, additive)[0]
    expected = hf.output.dense(context)
    torch.testing.assert_close(branch(hidden, sdpa_mask(padding)), expected, rtol=0, atol=1e-12)


def test_the_eager_implementation_takes_the_written_out_path_and_sdpa_the_fused_kernel(monkeypatch):
    branch, _ = branch_and_hf("eager")
    hidden = torch.randn(1, 4, 32, dtype=torch.float64)
    calls, fused = [], F.scaled_dot_product_attention
    monkeypatch.setattr(sublayers.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    branch(hidden)
    assert calls == []
    branch.config._attn_implementation = "sdpa"
    branch(hidden)
    assert calls == [1]
    with split_invariant(3, torch.arange(1), 1):  # no dropout to draw (eval): the fused kernel still
        branch(hidden)
    assert calls == [1, 1]
    branch.attention_dropout = 0.5
    branch.train()
    branch(hidden)  # dropout outside a split: the fused kernel's own draw
    assert calls == [1, 1, 1]
    with split_invariant(3, torch.arange(1), 1):  # inside one: the written-out path with the rows' streams
        branch(hidden)
    assert calls == [1, 1, 1]


def test_the_qkv_injection_is_added_to_each_projection():
    branch, _ = branch_and_hf("sdpa")
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 32, dtype=torch.float64, generator=generator)
    injection = torch.randn(2, 5, 96, dtype=torch.float64, generator=generator)
    dq, dk, dv = injection.split(32, dim=-1)

    def heads(x):
        return x.view(2, 5, 4, 8).transpose(1, 2)

    q, k, v = (heads(getattr(branch, n)(hidden) + d) for n, d in (("query", dq), ("key", dk), ("value", dv)))
    context = written_attention(q, k, v)[0].transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(branch(hidden, qkv_injection=injection), branch.dense(context), rtol=0, atol=1e-12)


def test_attention_dropout_defaults_to_the_configs_and_runs_only_in_training():
    config = tiny_ode_config(attention_probs_dropout_prob=0.5)
    assert AttentionBranch(config).attention_dropout == 0.5
    assert AttentionBranch(config, attention_dropout=0.0).attention_dropout == 0.0
    branch = AttentionBranch(config).double()
    hidden = torch.randn(1, 6, 32, dtype=torch.float64)
    branch.eval()
    assert torch.equal(branch(hidden), branch(hidden))
    branch.train()
    assert not torch.equal(branch(hidden), branch(hidden))
    quiet = AttentionBranch(config, attention_dropout=0.0).double().train()
    assert torch.equal(quiet(hidden), quiet(hidden))


def test_cross_attention_reads_the_encoders_states_in_the_queries_dtype_under_their_mask():
    torch.manual_seed(0)
    branch = CrossAttentionBranch(tiny_ode_config()).double().eval()
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 3, 32, dtype=torch.float64, generator=generator)
    states = torch.randn(2, 5, 32, generator=generator)  # float32: cast to the queries' float64
    padding = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    out = branch(hidden, CrossMemory(states, sdpa_mask(padding)))

    def heads(x):
        return x.view(2, x.shape[1], 4, 8).transpose(1, 2)

    q = heads(branch.query(hidden))
    k, v = heads(branch.key(states.double())), heads(branch.value(states.double()))
    additive = torch.where(padding.bool(), 0.0, -torch.inf).double()[:, None, None, :]
    context = written_attention(q, k, v, additive)[0].transpose(1, 2).reshape(2, 3, 32)
    assert out.dtype == torch.float64 and branch.positions is None
    torch.testing.assert_close(out, branch.dense(context), rtol=0, atol=1e-12)
    relative = tiny_ode_config(position_scheme="transformer_xl", is_decoder=True)
    assert CrossAttentionBranch(relative).positions is None and AttentionBranch(relative).positions is not None


def test_the_feed_forward_branch_applies_a_named_or_a_callable_activation():
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 32)
    named = FeedForwardBranch(tiny_ode_config(hidden_act="gelu"))
    expected = named.dense(F.gelu(named.intermediate(hidden)))
    torch.testing.assert_close(named(hidden), expected, rtol=0, atol=1e-6)
    called = FeedForwardBranch(SimpleNamespace(hidden_size=32, intermediate_size=64, hidden_act=torch.tanh))
    torch.testing.assert_close(called(hidden), called.dense(torch.tanh(called.intermediate(hidden))), rtol=0, atol=1e-6)
    assert FeedForwardBranch.per_token is True


# --- solver statistics: records and summaries against counts written out ------------------------------------------
def test_on_host_reads_tensors_as_python_numbers_in_their_promoted_dtype_and_leaves_the_input_alone():
    values = {"iterations": torch.tensor(7, dtype=torch.int32), "wide": torch.tensor([2 ** 40]), "rate": 0.5,
              "fine": torch.tensor(0.1, dtype=torch.float64), "coarse": torch.tensor([0.1], dtype=torch.float32),
              "flag": torch.tensor(True)}
    cast = on_host(values)
    assert cast == {"iterations": 7, "wide": 2 ** 40, "rate": 0.5, "fine": 0.1,
                    "coarse": float(torch.tensor(0.1, dtype=torch.float32)), "flag": True}
    assert type(cast["iterations"]) is int and type(cast["fine"]) is float and cast["fine"] == 0.1  # not via float32
    assert isinstance(values["iterations"], torch.Tensor)  # a copy is cast
    plain = {"a": 1}
    assert on_host(plain) is plain
    assert on_host({"first": torch.tensor(0.5, dtype=torch.float32), "second": torch.tensor(0.1, dtype=torch.float64)}
                   )["second"] == 0.1  # promoted to float64, whichever comes first


def test_a_solve_record_counts_forward_then_backward_evaluations_and_steps_from_its_times():
    record = SolveRecord("site")
    assert record.step_counts() == (None, None) and record.as_dict()["accepted_steps"] is None
    for _ in range(3):
        record.count_evaluation()
    record.phase = "backward"
    record.count_evaluation()
    record.count_evaluation()
    assert (record.nfe_forward, record.nfe_backward) == (3, 2)
    # attempts at t = 0 (rejected), 0, 0.25 (rejected), 0.25, 0.25, 0.5: three accepted, three rejected
    record.step_times = [torch.tensor(t) for t in (0.0, 0.0, 0.25, 0.25, 0.25, 0.5)]
    assert record.step_counts() == (3, 3)
    assert record.as_dict() == {"name": "site", "nfe_forward": 3, "nfe_backward": 2, "accepted_steps": 3,
                                "rejected_steps": 3}
    assert SolveRecord("fixed", fixed_steps=4, step_times=[torch.tensor(0.0)] * 3).step_counts() == (4, 0)


def test_a_per_sequence_record_reports_the_most_steps_any_row_took_and_every_rows_counts():
    per_sequence = {"accepted": torch.tensor([3, 5]), "rejected": torch.tensor([2, 1]), "nfe": None}
    record = SolveRecord("site", nfe_forward=9, per_sequence=per_sequence, step_times=[torch.tensor(0.0)])
    assert record.step_counts() == (5, 2)
    assert record.as_dict() == {"name": "site", "nfe_forward": 9, "nfe_backward": 0, "accepted_steps": 5,
                                "rejected_steps": 2, "accepted_per_sequence": [3, 5], "rejected_per_sequence": [2, 1],
                                "nfe_per_sequence": None}


def test_a_summary_sums_repeated_sites_and_per_sequence_lists_and_lifts_deq_and_counter_keys():
    a1 = SolveRecord("a", fixed_steps=2, nfe_forward=4, nfe_backward=1)
    a2 = SolveRecord("a", fixed_steps=3, nfe_forward=6, nfe_backward=2)
    def rows(accepted, rejected, nfe):
        return {"accepted": torch.tensor(accepted), "rejected": torch.tensor(rejected), "nfe": nfe}

    b1 = SolveRecord("b", nfe_forward=5, per_sequence=rows([1, 2], [0, 1], torch.tensor([4, 5])))
    b2 = SolveRecord("b", nfe_forward=7, per_sequence=rows([3, 1], [2, 0], torch.tensor([6, 7])))
    b3 = SolveRecord("b", nfe_forward=1, per_sequence={"accepted": torch.tensor([1, 1, 1]),
                                                     "rejected": torch.tensor([0, 0, 0]), "nfe": None})  # other batch
    deq = FixedPointRecord("deq", nfe_forward=11, nfe_backward=4, extra={"forward_iterations": torch.tensor(11)})
    stats = SolverStats([a1, a2, b1], counters={"steps_seen": torch.tensor(5)})
    stats.add(b2)
    stats.extend(SolverStats([b3, deq]))
    summary = stats.summary()
    a, b, d = summary["layers"]
    assert a == {"name": "a", "nfe_forward": 10, "nfe_backward": 3, "accepted_steps": 5, "rejected_steps": 0,
                 "solves": 2}
    assert b == {"name": "b", "nfe_forward": 13, "nfe_backward": 0, "accepted_steps": 6, "rejected_steps": 3,
                 "accepted_per_sequence": [4, 3], "rejected_per_sequence": [2, 1], "nfe_per_sequence": [10, 12],
                 "solves": 3}
    assert d == {"name": "deq", "nfe_forward": 11, "nfe_backward": 4, "accepted_steps": None, "rejected_steps": None,
                 "forward_iterations": 11, "solves": 1}
    assert {k: summary[k] for k in ("nfe_forward", "nfe_backward", "accepted_steps", "rejected_steps", "solves",
                                     "forward_iterations", "steps_seen")} == {
        "nfe_forward": 34, "nfe_backward": 7, "accepted_steps": 11, "rejected_steps": 3, "solves": 6,
        "forward_iterations": 11, "steps_seen": 5}
    assert stats["nfe_forward"] == 34 and list(stats) == list(summary) and len(stats) == len(summary)
    assert repr(stats) == f"SolverStats({summary!r})" and stats.exit_depths is None


def test_an_empty_or_adaptive_only_summary_has_zero_nfe_and_no_steps():
    assert SolverStats().summary() == {"nfe_forward": 0, "nfe_backward": 0, "accepted_steps": None,
                                       "rejected_steps": None, "solves": 0, "layers": []}
    summary = SolverStats([SolveRecord("a"), SolveRecord("a", nfe_forward=2, step_times=[torch.tensor(0.0)])]).summary()
    assert summary["layers"][0]["accepted_steps"] is None and summary["accepted_steps"] is None  # None + 1 stays None


@pytest.mark.parametrize("solver,stages", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_a_fixed_step_model_counts_stages_times_steps_per_site(solver, stages):
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(solver=solver, steps=3, num_hidden_layers=1)).eval()
    out = model(torch.randint(5, 64, (2, 5)))
    summary = out.solver_stats.summary()
    assert [(r["nfe_forward"], r["accepted_steps"], r["rejected_steps"]) for r in summary["layers"]] == [
        (3 * stages, 3, 0)] * 2
    assert (summary["nfe_forward"], summary["accepted_steps"], summary["solves"]) == (6 * stages, 6, 2)



@pytest.mark.parametrize("fields", [dict(solver="dopri5", sensitivity="adjoint"),
                                    dict(solver="dopri5", sensitivity="adjoint", ode_backend="torchdiffeq"),
                                    dict(solver="rk4", steps=3)], ids=["torchdyn", "torchdiffeq", "rk4-autograd"])
def test_each_sites_nfe_is_the_number_of_calls_its_field_gets_in_the_forward_and_in_the_backward(fields):
    """The oracle: a forward hook on each site's vector field counts its evaluations, phase by phase."""
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(atol=1e-6, rtol=1e-6, **fields)).train()
    calls = {}
    for index, layer in enumerate(model.encoder.layer):
        for kind in ("attention", "feed_forward"):
            name = f"layer.{index}.{kind}"
            calls[name] = [0]
            def count(*_, n=name):
                calls[n][0] += 1

            getattr(layer, kind).field.register_forward_hook(count)
    out = model(torch.randint(5, 64, (2, 6), generator=torch.Generator().manual_seed(9)))
    forward = {name: count[0] for name, count in calls.items()}
    projection_loss(out.last_hidden_state).backward()
    rows = {row["name"]: row for row in model.solver_stats()["layers"]}
    assert {n: (r["nfe_forward"], r["nfe_backward"]) for n, r in rows.items()} == {
        n: (forward[n], calls[n][0] - forward[n]) for n in calls}
    adjoint = fields.get("sensitivity") == "adjoint"
    assert min(forward.values()) > 0 and adjoint == (out.solver_stats["nfe_backward"] > 0)

# --- the observer --------------------------------------------------------------------------------------------------
def test_an_unknown_keep_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^Observer keep='every' is invalid; allowed: 'first', 'last', 'all'$"):
        Observer(attentions=True, keep="every")


def record_attentions(observer, evaluations):
    """Runs ``evaluations`` (layer, value, cross) through the observer the way a forward does."""
    for layer, value, cross in evaluations:
        observer.layer = layer
        if observer.needs_attention(cross):
            observer.attention(torch.full((2,), float(value)), cross)


EVALUATIONS = [(1, 10, False), (0, 1, False), (0, 2, False), (0, 5, True), (1, 11, False), (0, 6, True)]


@pytest.mark.parametrize("keep,self_values,cross_values", [
    ("first", [1, 10], [5]), ("last", [2, 11], [6]), ("all", [[1, 2], [10, 11]], [[5, 6]])])
def test_kept_attentions_are_per_layer_in_layer_order_first_last_or_all(keep, self_values, cross_values):
    observer = Observer(attentions=True, keep=keep)
    record_attentions(observer, EVALUATIONS)
    kept, cross = observer.attentions(), observer.attentions(cross=True)
    assert [t[..., 0].tolist() for t in kept] == self_values and [t[..., 0].tolist() for t in cross] == cross_values
    assert Observer(attentions=True).attentions(cross=True) is None and Observer().attentions() is None
    assert Observer(attentions=True).attentions() == ()


def test_a_first_observer_asks_for_each_layers_attention_once_and_its_replay_asks_the_same():
    observer = Observer(attentions=True, trajectory=True, keep="first")
    observer.layer = 0
    assert observer.needs_attention() and observer.needs_attention(cross=True)
    observer.attention(torch.zeros(1))
    assert not observer.needs_attention() and observer.needs_attention(cross=True)
    observer.attention(torch.zeros(1), cross=True)
    assert not observer.needs_attention(cross=True)
    twin = observer.replay()
    assert (twin.wants_attentions, twin.keep, twin.wants_trajectory) == (True, "first", False)
    assert twin._attentions == {0: []} and twin._cross == {0: []} and observer._attentions[0] != []
    twin.layer = 0
    assert not twin.needs_attention() and not twin.needs_attention(cross=True)
    twin.layer = 1
    assert twin.needs_attention()
    assert not Observer(attentions=False).needs_attention()
    assert Observer(attentions=True, keep="all").replay().keep == "all"


def test_a_trajectory_keeps_increasing_times_first_channels_and_the_finished_outputs():
    observer = Observer(trajectory=True)
    z0 = torch.zeros(2, 3)
    observer.begin("site", 0, z0)
    observer.note(torch.tensor(0.5), torch.arange(8.0).reshape(2, 4) + 1)  # an augmented state: 4 channels
    observer.note(0.5, torch.full((2, 3), 9.0))  # a repeated time (a rejected step): dropped
    observer.note(0.25, torch.full((2, 3), 9.0))  # an earlier time: dropped
    z1, output = torch.full((2, 3), 3.0), torch.full((2, 3), -1.0)
    observer.end(torch.tensor(1.0), z1 + 100, finish=lambda state: 2 * state, output=output)
    (solve,) = observer.trajectory()
    assert solve["name"] == "site" and torch.equal(solve["times"], torch.tensor([0.0, 0.5, 1.0]))
    middle = (torch.arange(8.0).reshape(2, 4) + 1)[:, :3]
    assert torch.equal(solve["states"], torch.stack([z0, middle, z1 + 100]))
    assert torch.equal(solve["outputs"], torch.stack([z0, 2 * middle, output]))
    observer.begin("plain", 1, z0)
    observer.end(2, z1)
    assert torch.equal(observer.trajectory()[1]["outputs"], torch.stack([z0, z1]))
    assert observer._open is None
    quiet = Observer(trajectory=False)
    quiet.begin("site", 0, z0)
    quiet.note(0.5, z0)
    quiet.end(1.0, z0)
    assert quiet.trajectory() is None and quiet.solves == []


def test_observing_sets_the_active_observer_and_restores_the_previous_one_after_an_error():
    outer, inner = Observer(), Observer()
    assert observe.active() is None
    with observe.observing(outer) as given:
        assert given is outer and observe.active() is outer
        with pytest.raises(RuntimeError):
            with observe.observing(inner):
                assert observe.active() is inner
                raise RuntimeError
        assert observe.active() is outer
    assert observe.active() is None


# --- host syncs ------------------------------------------------------------------------------------------------------
ATEN = torch.ops.aten


def test_each_kind_of_op_is_named_or_not_counted_as_the_rules_say():
    x, meta = torch.ones(3), torch.ones(3, device="meta")  # meta: a tensor that is not on the host
    bools, ints = torch.tensor([True, False, True]), torch.tensor([0, 2])
    assert sync_op_name(ATEN._local_scalar_dense.default, (x[0],), {}) == "aten._local_scalar_dense"
    assert sync_op_name(ATEN.nonzero.default, (x,), {}) == "aten.nonzero"
    assert sync_op_name(ATEN.add.Tensor, (x, x), {}) is None
    assert sync_op_name(ATEN.index.Tensor, (x, [bools]), {}) == "aten.index (bool mask)"
    assert sync_op_name(ATEN.index.Tensor, (x, [bools.to(torch.uint8)]), {}) == "aten.index (bool mask)"
    assert sync_op_name(ATEN.index.Tensor, (x, [None, ints]), {}) is None
    put = ATEN.index_put_.default
    assert sync_op_name(put, (x,), {"indices": [bools], "values": x}) == "aten.index_put_ (bool mask)"
    assert sync_op_name(put, (x,), {}) is None
    repeats = torch.tensor([1, 2, 0])
    assert sync_op_name(ATEN.repeat_interleave.Tensor, (repeats,), {}) == "aten.repeat_interleave"
    assert sync_op_name(ATEN.repeat_interleave.self_Tensor, (x, repeats), {}) == "aten.repeat_interleave"
    assert sync_op_name(ATEN.repeat_interleave.Tensor, (repeats,), {"output_size": 3}) is None
    with count_host_syncs() as syncs:  # int repeats reach the dispatcher as expand and view: no sync
        x.repeat_interleave(2)
        x.repeat_interleave(repeats, output_size=3)
    assert syncs.count == 0
    to_copy = ATEN._to_copy.default
    assert sync_op_name(to_copy, (meta,), {"device": torch.device("cpu")}) == "aten._to_copy (device to host)"
    assert sync_op_name(to_copy, (meta,), {"device": "cpu"}) == "aten._to_copy (device to host)"
    assert sync_op_name(to_copy, (meta,), {"device": "cpu", "non_blocking": True}) is None
    assert sync_op_name(to_copy, (meta,), {"dtype": torch.float64}) is None  # no device: stays where it is
    assert sync_op_name(to_copy, (x,), {"device": "cpu"}) is None
    assert sync_op_name(to_copy, (x,), {"device": "meta"}) is None  # host to device
    assert sync_op_name(ATEN.copy_.default, (x, meta), {}) == "aten.copy_ (device to host)"
    assert sync_op_name(ATEN.copy_.default, (x, meta), {"non_blocking": True}) is None
    assert sync_op_name(ATEN.copy_.default, (meta, x), {}) is None  # host to device
    assert sync_op_name(ATEN.copy_.default, (x, x), {}) is None


def test_a_count_names_its_ops_and_the_test_line_that_asked_and_restores_the_tensor_methods():
    tolist, numpy = torch.Tensor.tolist, torch.Tensor.numpy
    x = torch.arange(4.0)
    with count_host_syncs() as syncs:
        assert torch.Tensor.tolist.__name__ == "tolist" and torch.Tensor.tolist.__doc__ == tolist.__doc__
        x.tolist()
        line = sys._getframe().f_lineno - 1
        x.numpy()
        x[x > 1]
    assert torch.Tensor.tolist is tolist and torch.Tensor.numpy is numpy
    assert syncs.count == 3 and syncs.by_op == {"Tensor.tolist": 1, "Tensor.numpy": 1, "aten.index (bool mask)": 1}
    assert syncs.sites[f"{__file__}:{line}"] == 1 and sum(syncs.sites.values()) == 3
    record = HostSyncs()
    record.add("op")
    assert (record.count, dict(record.by_op)) == (1, {"op": 1})
    assert syncs_in_optimizer_step() == 0


def syncs_in_optimizer_step() -> int:
    """torch.optim's host-side ``step`` reads are not counted; the same read by the caller is."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight], lr=0.1, foreach=False)
    weight.grad = torch.ones(3)
    optimizer.step()
    with count_host_syncs() as syncs:
        weight.grad = torch.ones(3)
        optimizer.step()
    with count_host_syncs() as mine:
        optimizer.state[weight]["step"].item()
    assert mine.count == 1
    return syncs.count


def test_attention_dropout_inside_a_split_draws_each_rows_mask_from_its_own_stream():
    """Under `split_invariant` the dropped probabilities come from each row's stream (the eager path), so a row
    gets the same output whether its batch holds the other row or not; SDPA's own draw would differ."""
    torch.manual_seed(0)
    branch = AttentionBranch(tiny_ode_config(attention_probs_dropout_prob=0.5)).double().train()
    hidden = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with split_invariant(7, torch.arange(2), 2):
        both = branch(hidden)
    with split_invariant(7, torch.tensor([1]), 2):
        second = branch(hidden[1:])
    torch.testing.assert_close(second, both[1:], rtol=0, atol=1e-12)
    assert (both - branch.eval()(hidden)).abs().max() > 1e-3  # and something was dropped


def test_recorded_attentions_without_attention_dropout_leave_the_hidden_dropout_masks_as_they_were():
    """The eager path (``output_attentions``) draws no mask at p = 0, so a training forward's hidden dropout
    masks, drawn from torch's generator after it, are those of the fused path."""
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(hidden_dropout_prob=0.3, solver="rk4", steps=2)).train()
    ids = torch.randint(5, 64, (2, 6), generator=torch.Generator().manual_seed(7))
    outputs = []
    for attentions in (False, True):
        torch.manual_seed(1)
        outputs.append(model(ids, output_attentions=attentions).last_hidden_state)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)


def test_active_queries_under_a_causal_mask_of_two_positions_are_the_dense_rows():
    """Per-token exit packs each row's active queries to the left; their causal mask rows are gathered at their
    own positions, for two positions too (row 1 has only its second token active, packed into slot 0)."""
    branch, _ = branch_and_hf("sdpa")
    hidden = torch.randn(2, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    mask = sdpa_mask(None, causal=True, length=2)
    active = ActiveTokens(torch.tensor([[True, True], [False, True]]))
    dense = branch(hidden, mask)
    torch.testing.assert_close(branch(hidden, mask, active=active), dense[active.mask], rtol=0, atol=1e-12)


def test_a_counter_opened_in_a_fresh_thread_counts_each_read_once_and_passes_the_methods_arguments_on():
    """A thread that never counted before (no suppression depth yet) counts every read; ``numpy(force=True)``
    reaches numpy with its argument; another dispatch mode on the stack is passed over."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    results = []

    def count():
        x = torch.arange(4.0, requires_grad=True)
        with count_host_syncs() as syncs:
            x.detach().tolist()
            x.numpy(force=True)
            x.detach()[x.detach() > 1]
            with PassThrough():
                x.detach().tolist()
        results.append(dict(syncs.by_op))

    thread = threading.Thread(target=count)
    thread.start()
    thread.join()
    assert results == [{"Tensor.tolist": 2, "Tensor.numpy": 1, "aten.index (bool mask)": 1}]
