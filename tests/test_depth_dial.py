"""The depth dial inside the model (`bertode.dialed`): depth, truncated backprop, per-token exit.

Oracles: autograd through every step (k >= depth must equal it bit for bit), a hand-written
truncated Euler recursion, the undialled model (threshold 0 must equal no exit), and the
causality of a decoder (exits and logits at positions <= i never read later tokens)."""

import pytest
import torch

import bertode
from bertode import BertODEConfig, BertODEForCausalLM, BertODEForMaskedLM
from bertode.solve.ode import ODESolve

TINY = dict(vocab_size=60, hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LOOPED = dict(mode="discrete", weight_tying=True, core_injection="add", num_hidden_layers=4)
DEQ = dict(mode="deq", sensitivity="unrolled", deq_tol=1e-12, deq_max_iter=8, num_hidden_layers=2)


def model(cls=BertODEForMaskedLM, seed=0, init=0.02, **fields):
    torch.manual_seed(seed)
    return cls(BertODEConfig(**TINY, initializer_range=init, **fields))


def batch(seed=1, length=9, pad=True):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 60, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, -3:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def grads(net, **dial):
    net.zero_grad()
    with bertode.dialed(**dial):
        out = net(**batch())
    out.logits.square().mean().backward()
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- depth ------------------------------------------------------------------------------
def test_the_dialled_depth_is_what_each_encoder_iterates():
    inputs = batch()
    looped = model(**LOOPED).eval()
    with bertode.dialed(depth=7):
        assert looped(**inputs).solver_stats["depth"] == 7
    deq = model(**DEQ).eval()
    with bertode.dialed(depth=5):
        assert deq(**inputs).solver_stats["forward_iterations"] == 5
    ode = model(mode="ode", solver="rk4", steps=1, num_hidden_layers=2).eval()
    with bertode.dialed(depth=3):  # untied: each of the 4 solves takes 3 rk4 steps
        assert ode(**inputs).solver_stats["nfe_forward"] == 4 * 3 * 4
    assert ode(**inputs).solver_stats["nfe_forward"] == 4 * 1 * 4  # the dial is gone after the block


def test_a_looped_core_at_depth_n_is_the_tied_layer_applied_n_times():
    net = model(**LOOPED, init=0.3).eval()
    inputs = batch()
    with bertode.dialed(depth=6):
        dialled = net(**inputs, output_hidden_states=True)
    embeddings = net.bert.embeddings(input_ids=inputs["input_ids"])
    mask = bertode.layers.sublayers.sdpa_mask(inputs["attention_mask"])
    encoder, z = net.bert.encoder, torch.zeros_like(embeddings)
    for index in range(6):
        z, _ = encoder.layer[0](z + encoder.injection(embeddings), mask, bertode.layers.encoder.Pass(index))
    torch.testing.assert_close(dialled.hidden_states[-1], z, rtol=0, atol=1e-6)
    assert len(dialled.hidden_states) == 7


# --- truncated backpropagation --------------------------------------------------------------
@pytest.mark.parametrize("fields,depth", [(LOOPED, 4), (DEQ, 8), (dict(mode="ode", solver="rk4", steps=3,
                                                                      num_hidden_layers=2), 3)])
def test_backprop_through_k_at_least_the_depth_equals_full_autograd_exactly(fields, depth):
    net = model(**fields, init=0.2).train()
    full = grads(net)
    assert_equal(grads(net, backprop=depth), full)
    assert_equal(grads(net, backprop=depth + 5), full)
    truncated = grads(net, backprop=1)
    assert any(not torch.equal(truncated[name], full[name]) for name in full)


def test_truncated_ode_gradient_equals_the_hand_written_truncated_euler_recursion():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 4) * 0.5)
    z0 = torch.randn(3, 5, 4)
    steps, keep, h = 6, 2, 1.0 / 6

    def field(t, z):
        return torch.tanh(z @ weight.T)

    solve = ODESolve("euler", steps=steps)
    z1, _ = solve(z0, field, [weight], 0.0, 1.0, steps=steps, backprop=keep)
    (dz,) = torch.autograd.grad(z1.square().sum(), weight)
    z = z0
    with torch.no_grad():
        for _ in range(steps - keep):
            z = z + h * field(0, z)
    for _ in range(keep):
        z = z + h * field(0, z)
    (oracle,) = torch.autograd.grad(z.square().sum(), weight)
    torch.testing.assert_close(dz, oracle, rtol=1e-6, atol=1e-7)


def test_phantom_takes_the_dialled_k_as_its_steps():
    fields = dict(DEQ, sensitivity="phantom", deq_max_iter=20, deq_tol=1e-4)
    three_steps = model(**fields, deq_phantom_steps=3, init=0.2).train()
    one_step = model(**fields, init=0.2).train()
    assert_equal(grads(one_step, backprop=3), grads(three_steps))


# --- per-token exit -----------------------------------------------------------------------------
CASES = {"looped": LOOPED, "looped_ode_rk4": dict(LOOPED, mode="ode", solver="rk4"), "deq": DEQ,
         "deq_qkv": dict(DEQ, deq_injection="qkv", num_hidden_layers=3)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("criterion", ["latent_diff", "kl"])
def test_threshold_zero_gives_outputs_identical_to_no_exit(case, criterion):
    net = model(**CASES[case], init=0.3).eval()
    inputs = batch()
    with bertode.dialed(depth=6):
        plain = net(**inputs, output_hidden_states=True)
    with bertode.dialed(depth=6, exit=bertode.make_exit_criterion(criterion, 0.0)):
        exited = net(**inputs, output_hidden_states=True)
    assert torch.equal(exited.logits, plain.logits)
    assert exited.solver_stats["exit_depth_mean"] == exited.solver_stats["exit_depth_max"] == 6


def exit_run(net, inputs, threshold, criterion="latent_diff", depth=12):
    states = {}
    with bertode.dialed(depth=depth, exit=bertode.make_exit_criterion(criterion, threshold),
                        on_iterate=lambda n, z: states.__setitem__(n, z.detach().clone())):
        out = net(**inputs)
    return out, states, net.bert.encoder.last_stats.exit_depths


@pytest.mark.parametrize("case", CASES)
def test_an_exited_token_keeps_its_state_and_the_others_go_on(case):
    net = model(**CASES[case], init=0.3).eval()
    inputs = batch()
    _, _, plain_depths = exit_run(net, inputs, 0.0)
    for threshold in (0.3, 0.1, 0.03, 0.01, 3e-3):
        out, states, depths = exit_run(net, inputs, threshold)
        if 1 < len(set(depths[inputs["attention_mask"].bool()].tolist())):
            break
    else:
        pytest.fail(f"no threshold gave tokens different exit depths: {depths.tolist()}")
    last = max(states)
    assert last == depths.max()
    for (b, position), depth in zip(torch.cartesian_prod(torch.arange(2), torch.arange(9)).tolist(), depths.flatten()):
        for n in range(int(depth), last + 1):
            assert torch.equal(states[n][b, position], states[int(depth)][b, position]), (b, position, n)
        if depth > 1:  # it was still moving the iteration before it stopped
            assert not torch.equal(states[int(depth) - 1][b, position], states[int(depth)][b, position])
    real = inputs["attention_mask"].bool()
    assert out.solver_stats["exit_depth_mean"] == pytest.approx(depths[real].float().mean().item())
    assert out.solver_stats["exit_depth_max"] == int(depths[real].max())


@pytest.mark.parametrize("case", ["looped", "deq"])
@pytest.mark.parametrize("criterion", ["latent_diff", "kl"])
def test_causal_exit_decisions_and_logits_never_read_later_tokens(case, criterion):
    net = model(BertODEForCausalLM, **CASES[case], init=0.3, is_decoder=True).eval()
    inputs = batch(pad=False, length=10)
    changed = {k: v.clone() for k, v in inputs.items()}
    i = 5
    changed["input_ids"][:, i + 1:] = (changed["input_ids"][:, i + 1:] + 7) % 56 + 4
    for threshold in (0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6):
        out, _, depths = exit_run(net, inputs, threshold, criterion)
        if len(set(depths[:, : i + 1].flatten().tolist())) > 1:  # the probe has exits to compare
            break
    else:
        pytest.fail(f"no threshold gave the first {i + 1} tokens different exit depths")
    out2, _, depths2 = exit_run(net, changed, threshold, criterion)
    assert torch.equal(depths[:, : i + 1], depths2[:, : i + 1])
    torch.testing.assert_close(out.logits[:, : i + 1], out2.logits[:, : i + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(out.logits[:, i + 1:], out2.logits[:, i + 1:])


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("injection", [False, True])
def test_a_layer_on_the_active_rows_equals_the_dense_layer_there_and_leaves_the_rest(norm_position, injection):
    net = model(mode="discrete", num_hidden_layers=1, init=0.3, norm_position=norm_position).eval()
    layer = net.bert.encoder.layer[0]
    torch.manual_seed(3)
    x = torch.randn(2, 9, 32)
    qkv = torch.randn(2, 9, 96) if injection else None
    mask = bertode.layers.sublayers.sdpa_mask(batch()["attention_mask"])
    active = torch.rand(2, 9) < 0.5
    active[1, :] = False  # a row with no active token at all
    active[1, 4] = True
    tokens = bertode.layers.loop.ActiveTokens(active)
    Pass = bertode.layers.encoder.Pass
    dense, _ = layer(x, mask, Pass(0, qkv))
    # the dense oracle for the feed-forward site: its input is the attention site's output on every row,
    # where exited rows keep x
    attended, _ = layer.attention(x, mask, Pass(0, qkv))
    oracle, _ = layer.feed_forward(torch.where(active[..., None], attended, x), mask, Pass(0, qkv))
    packed, _ = layer(x, mask, Pass(0, qkv, active=tokens))
    torch.testing.assert_close(packed[active], oracle[active], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[active], dense[active], rtol=0, atol=1e-5)  # attention reads every token's keys
    assert torch.equal(packed[~active], x[~active])


# --- review findings: the input keeps its gradient, exit is an inference dial, attentions keep their shape -----
@pytest.mark.parametrize("fields,dial", [(dict(mode="ode", solver="euler", steps=4, num_hidden_layers=3), {}),
                                         (dict(LOOPED, core_injection=None, prelude_layers=1, coda_layers=1,
                                               num_hidden_layers=6), {"depth": 4})])
def test_truncation_leaves_no_parameter_without_a_gradient(fields, dial):
    net = model(**fields, init=0.2).train()
    missing = [name for name, g in grads(net, backprop=2, **dial).items() if not g.abs().sum() > 0]
    unreached = {name for name, p in net.named_parameters()} - set(grads(net, backprop=2, **dial))
    assert not missing and not unreached, (missing, unreached)


def test_the_skipped_steps_pass_the_inputs_gradient_on_unchanged():
    """Oracle: d z1 / d z0 of a truncated solve is the identity through the skipped steps, then the
    Jacobian of the kept ones (Jacobian-free backprop over the first steps)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 4) * 0.5)
    z0 = torch.randn(3, 5, 4, requires_grad=True)
    steps, keep, h = 6, 2, 1.0 / 6

    def field(t, z):
        return torch.tanh(z @ weight.T)

    z1, _ = ODESolve("euler", steps=steps)(z0, field, [weight], 0.0, 1.0, steps=steps, backprop=keep)
    (dz0,) = torch.autograd.grad(z1.square().sum(), z0)
    with torch.no_grad():
        z = z0.clone()
        for _ in range(steps - keep):
            z = z + h * field(0, z)
    start = z.clone().requires_grad_()
    z = start
    for _ in range(keep):
        z = z + h * field(0, z)
    (oracle,) = torch.autograd.grad(z.square().sum(), start)
    torch.testing.assert_close(dz0, oracle, rtol=1e-6, atol=1e-7)


def test_exit_while_training_is_refused_in_one_line():
    for fields in (LOOPED, DEQ):
        net = model(**fields).train()
        with pytest.raises(ValueError, match=r"^exit='latent_diff' is invalid while training .*allowed: model.eval\(\)"):
            with bertode.dialed(exit=bertode.make_exit_criterion("latent_diff", 0.1)):
                net(**batch())


@pytest.mark.parametrize("case", ["looped", "deq"])
def test_attentions_under_exit_keep_their_shape_and_exited_rows_are_zero(case):
    net = model(**CASES[case], init=0.3).eval()
    inputs = batch(pad=False)
    for threshold in (0.3, 0.1, 0.03, 0.01):
        with torch.no_grad(), bertode.dialed(depth=12, exit=bertode.make_exit_criterion("latent_diff", threshold)):
            out = net(**inputs, output_attentions="all")
        depths = net.bert.encoder.last_stats.exit_depths
        if len(set(depths.flatten().tolist())) > 1:
            break
    # every evaluation of the first layer, (evaluations, batch, heads, seq, seq): a looped core reports one entry per
    # application, a DEQ one entry per layer of its map with every iteration stacked
    stacked = torch.cat(out.attentions) if case == "looped" else out.attentions[0]
    assert stacked.shape[-2:] == (9, 9) and stacked.shape[0] == int(depths.max())
    for n in range(stacked.shape[0]):  # the n-th application: tokens already exited attend nowhere, the others sum to 1
        sums = stacked[n].sum(-1)  # (batch, heads, seq)
        running = (depths > n)[:, None, :].expand_as(sums)
        torch.testing.assert_close(sums[running], torch.ones_like(sums[running]))
        assert torch.equal(sums[~running], torch.zeros_like(sums[~running]))
