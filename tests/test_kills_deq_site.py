"""Kill tests for bertode/layers/deq.py, site.py and encoder.py (issue 29, mutation testing): each checks a number
against an oracle written here (the DEQ map from its equations, float64 references, HF at Euler-1) or a one-line
refusal."""

import copy

import pytest
import torch

import bertode
from bertode import BertODEConfig, BertODEForMaskedLM, BertODEModel
from bertode.layers.deq import apply_weight_norm
from bertode.layers.site import Pass
from bertode.layers.sublayers import sdpa_mask
from bertode.solve.fixed_point import FIXED_POINT_SOLVERS, checking_every

from conftest import TINY


def build(cls=BertODEModel, seed=0, **fields):
    torch.manual_seed(seed)
    return cls(BertODEConfig(**{**TINY, "initializer_range": 0.3, **fields}))


def perturb(model, seed=3):
    """LayerNorms and the injection away from their identity initialisation (LN(LN(x)) = LN(x) otherwise)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
        injection = getattr(model.base_model.encoder, "injection", None)
        if injection is not None:
            injection.weight.add_(0.2 * torch.randn(injection.weight.shape, generator=generator))
            injection.bias.copy_(0.1 * torch.randn(injection.bias.shape, generator=generator))
    return model


def inputs(seed=1, length=9):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 60, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return dict(input_ids=ids, attention_mask=mask)


# --- deq.py ------------------------------------------------------------------------------------------------------
DEQ = dict(mode="deq", deq_damping=0.8, hidden_dropout_prob=0.3)


def exit_reference(model, batch, depths, iterations):
    """The per-token exit iteration written out with dense layers: a token with exit depth d takes iterations
    1..d; in later ones it keeps its state, at layer 0 enters as state + U e, and at every later layer supplies
    the layer input of its last active iteration. z_{k+1} = (1 - tau) z_k + tau Layers(z_k + U e)."""
    encoder, tau = model.encoder, model.config.deq_damping
    embeddings = model.embeddings(input_ids=batch["input_ids"])
    mask = sdpa_mask(batch["attention_mask"])
    add, masks = encoder.injection(embeddings), {}
    z, cache = torch.zeros_like(embeddings), {}
    for k in range(iterations):
        active = (depths > k)[..., None]
        hidden = z + add
        for index, layer in enumerate(encoder.layer):
            if index > 0 and k > 0:
                hidden = torch.where(active, hidden, cache[index])
            cache[index] = hidden
            hidden, _ = layer(hidden, mask, Pass(index, None, masks))
        z = torch.where(active, (1 - tau) * z + tau * hidden, z)
    return z


@pytest.mark.parametrize("train", [False, True])
def test_per_token_exit_of_a_deq_is_the_damped_iteration_written_out(train):
    """Eval, and train mode without gradients (one dropout mask per (layer, site), drawn at the first
    evaluation in the same order as written out here): outputs, iterations, records and hidden states."""
    model = perturb(build(**DEQ).double()).train(train)
    batch = inputs()
    for threshold in (0.1, 0.03, 0.01, 3e-3):
        torch.manual_seed(5)
        with torch.no_grad(), bertode.dialed(depth=10, exit=bertode.make_exit_criterion("latent_diff", threshold)):
            out = model(**batch, output_hidden_states=True)
        depths = model.encoder.last_stats.exit_depths
        if len(set(depths[batch["attention_mask"].bool()].tolist())) > 1:
            break
    else:
        pytest.fail(f"no threshold gave tokens different exit depths: {depths.tolist()}")
    record = model.encoder.last_stats.records[0]
    iterations = record.nfe_forward
    assert iterations == int(depths[batch["attention_mask"].bool()].max()) == record.extra["forward_iterations"]
    assert record.name == "deq" and model.encoder.training_forwards.item() == int(train)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = exit_reference(model, batch, depths, iterations)
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=0, atol=1e-12)
    torch.manual_seed(5)  # the same embedding dropout in train mode
    embeddings = model.embeddings(input_ids=batch["input_ids"])
    assert len(out.hidden_states) == 2 and torch.equal(out.hidden_states[1], out.last_hidden_state)
    torch.testing.assert_close(out.hidden_states[0], embeddings, rtol=0, atol=0)


def test_a_deqs_map_evaluates_its_layers_with_one_dropout_mask_per_layer_and_site():
    model = perturb(build(**DEQ, num_hidden_layers=2).double()).train()
    encoder, batch = model.encoder, inputs()
    embeddings = model.embeddings(input_ids=batch["input_ids"])
    mask = sdpa_mask(batch["attention_mask"])
    masks: dict = {}
    z = torch.randn(2, 9 * 32, dtype=torch.float64)
    with torch.no_grad():
        fz = encoder.evaluate_map(z, embeddings.shape, encoder.injection(embeddings), None, mask, masks,
                                  torch.float64, torch.float64)
        assert sorted(masks) == [(0, "attention"), (0, "feed_forward"), (1, "attention"), (1, "feed_forward")]
        for keep in masks.values():  # 0 or 1 / (1 - p)
            assert set(keep.unique().tolist()) <= {0.0, 1 / 0.7} and keep.shape == embeddings.shape
        hidden = z.view(embeddings.shape) + encoder.injection(embeddings)
        for index, layer in enumerate(encoder.layer):  # LN(x + G(x) m) at each site, written out
            for name in ("attention", "feed_forward"):
                site = getattr(layer, name)
                update = site.branch(hidden, mask) if name == "attention" else site.branch(hidden)
                hidden = site.norm(hidden + update * masks[index, name])
        torch.testing.assert_close(fz.view(embeddings.shape), hidden, rtol=0, atol=1e-12)
        again = encoder.evaluate_map(z, embeddings.shape, encoder.injection(embeddings), None, mask, masks,
                                     torch.float64, torch.float64)
        assert torch.equal(again, fz)


def test_the_forward_solve_passes_the_configured_stop_mode_damping_and_memory():
    """_solve against the registered solver called with the config's options (each of which changes the
    result here: the defaults' iterate differs)."""
    model = build(mode="deq", deq_solver="anderson", deq_stop_mode="abs", deq_damping=0.6, deq_memory=2)
    generator = torch.Generator().manual_seed(0)
    a = 0.5 * torch.randn(12, 12, generator=generator, dtype=torch.float64) / 12 ** 0.5
    b = 10 * torch.randn(3, 12, generator=generator, dtype=torch.float64)  # |f(z)| ~ 30: rel and abs stop apart
    f = lambda z: z @ a.T + b
    z0 = torch.zeros(3, 12, dtype=torch.float64)
    ours, info = model.encoder._solve(f, z0, "anderson", 40, 1e-6, "x")
    solver = FIXED_POINT_SOLVERS["anderson"]
    with checking_every(model.config.deq_check_every):  # the config's (5): the stop is read every 5 iterations
        theirs, their_info = solver(f, z0, 40, 1e-6, stop_mode="abs", damping=0.6, memory=2, name="x")
    assert torch.equal(ours, theirs) and info.iterations == their_info.iterations
    for options in (dict(stop_mode="rel", damping=0.6, memory=2), dict(stop_mode="abs", damping=1.0, memory=2),
                    dict(stop_mode="abs", damping=0.6, memory=5)):
        with checking_every(model.config.deq_check_every):
            other, other_info = solver(f, z0, 40, 1e-6, name="x", **options)
        assert not torch.equal(other, ours) or other_info.iterations != info.iterations, options


def test_the_forward_solve_takes_the_dialled_depth_under_ift():
    model = build(mode="deq", deq_tol=1e-30, deq_max_iter=30).eval()
    with torch.no_grad(), bertode.dialed(depth=4):
        model(**inputs())
    assert model.encoder.last_forward_info.iterations == 4


def test_caching_refusals_name_the_exit_first_then_training_with_gradients():
    model = build(mode="deq")
    encoder = model.encoder
    assert encoder.train().caching_refusal() == ("mode='deq' while training with gradients on (caching is an "
                                                 "inference path here)")
    with torch.no_grad():
        assert encoder.caching_refusal() is None
    assert encoder.eval().caching_refusal() is None
    with bertode.dialed(exit=bertode.make_exit_criterion("latent_diff", 0.1)):
        assert encoder.train().caching_refusal() == "exit='latent_diff' (per-token exit)"


def test_checkpointing_a_deq_is_refused_in_one_line():
    model = build(BertODEForMaskedLM, mode="deq")
    with pytest.raises(ValueError) as error:
        model.gradient_checkpointing_enable()
    assert str(error.value) == (
        "gradient_checkpointing_enable() is invalid with mode='deq': the implicit gradient keeps no activations of "
        "the solve (memory is already constant in its iterations); allowed: mode='discrete' or mode='ode' with "
        "sensitivity='autograd'")


def test_a_copy_of_a_compiled_deq_or_site_is_uncompiled_and_computes_the_same():
    model = build(mode="deq").eval()
    encoder, site = model.encoder, model.encoder.layer[0].attention
    encoder.compiled_map, site.compiled_evaluate = "compiled", "compiled"
    encoder_copy, site_copy = copy.deepcopy(encoder), copy.deepcopy(site)
    assert encoder_copy.compiled_map is None and site_copy.compiled_evaluate is None
    assert encoder.compiled_map == "compiled" and "COMPILED_MAP" not in vars(encoder_copy)
    assert torch.equal(encoder_copy.injection.weight, encoder.injection.weight)
    assert torch.equal(site_copy.norm.weight, site.norm.weight)


def test_weight_norm_parametrises_every_linear_map_once():
    model = build(mode="deq", deq_weight_norm=True)
    linears = [m for m in model.encoder.layer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 6
    for linear in linears:
        (norm,) = linear.parametrizations.weight  # one weight norm: g |v|-normalised rows
        g, v = linear.parametrizations.weight.original0, linear.parametrizations.weight.original1
        torch.testing.assert_close(linear.weight, g * v / v.norm(dim=1, keepdim=True))
    apply_weight_norm(model.encoder.layer)  # again: nothing is wrapped twice
    assert all(len(linear.parametrizations.weight) == 1 for linear in linears)
    plain = build(mode="deq")
    assert not any(hasattr(m, "parametrizations") for m in plain.encoder.layer.modules())


def test_the_jacobian_penalty_of_c_times_an_orthogonal_map_is_c_squared_with_its_gradient():
    """|eps^T J|^2 / dim for J = c Q (Q orthogonal) is c^2 |eps|^2 / dim = c^2 for any Rademacher probe."""
    model = build(mode="deq")
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    record = bertode.solve.stats.FixedPointRecord("deq")
    for seed in range(3):
        torch.manual_seed(seed)
        penalty = model.encoder._jacobian_penalty(lambda z: c * z @ q, torch.randn(3, 8, dtype=torch.float64), record)
        torch.testing.assert_close(penalty, torch.tensor(0.49, dtype=torch.float64))
        (grad,) = torch.autograd.grad(penalty, c)
        torch.testing.assert_close(grad, torch.tensor(1.4, dtype=torch.float64))
        assert torch.equal(record.extra["jac_loss"], penalty.detach())


def test_the_spectral_radius_is_twenty_power_iterations_per_row():
    """|A^20 v| / |A^19 v| per row (the vjp's power iteration, v the seeded draw), the rows' maximum: a
    Jordan block converges slowly, so the count shows."""
    model = build(mode="deq")
    a = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    z = torch.randn(2, 3, dtype=torch.float64)
    torch.manual_seed(4)
    estimate = model.encoder._spectral_radius(lambda x: x @ a.T, z)
    torch.manual_seed(4)
    v = torch.randn(2, 3, dtype=torch.float64)
    rows = [(v[r] @ torch.linalg.matrix_power(a, 20)).norm() / (v[r] @ torch.linalg.matrix_power(a, 19)).norm()
            for r in range(2)]
    assert estimate == pytest.approx(max(rows).item(), rel=1e-12)


def test_the_backward_solve_is_named_and_skipped_or_raised_as_configured(monkeypatch):
    """A non-finite implicit backward: one line naming the solve, or (``skip``) zeros, one count, the rollback
    callback and the logged line; a named solver is used as named, the default otherwise."""
    warnings = []
    monkeypatch.setattr(bertode.layers.deq.logger, "warning", lambda message, *args: warnings.append(message % args))
    h = lambda g: g * float("nan")
    line = r"DEQ backward \(implicit-function\) solve of the map over layers 0-1: non-finite value in f\(z\)"
    raising = build(mode="deq", deq_on_nonfinite="raise")
    with pytest.raises(bertode.DEQSolveError, match="^" + line):
        raising.encoder._backward_solver(bertode.solve.stats.FixedPointRecord("deq"), None)(h, torch.ones(2, 4), None,
                                                                                           5, 1e-6)
    skipping, calls = build(mode="deq", deq_on_nonfinite="skip"), []
    g = skipping.encoder._backward_solver(bertode.solve.stats.FixedPointRecord("deq"), lambda: calls.append(1))(
        h, torch.ones(2, 4), "broyden", 5, 1e-6)
    assert torch.equal(g, torch.zeros(2, 4)) and calls == [1] and skipping.encoder.skipped_batches.item() == 1
    assert len(warnings) == 1 and __import__("re").match("^skipping a batch: " + line, warnings[0])
    a = torch.tensor([[0.5, 0.2], [0.1, 0.3]], dtype=torch.float64)
    linear = lambda g: g @ a + 1
    g0 = torch.zeros(1, 2, dtype=torch.float64)
    for name in ("fixed_point", "broyden"):
        ours = skipping.encoder._backward_solver(bertode.solve.stats.FixedPointRecord("deq"), None)(linear, g0, name, 3,
                                                                                                    1e-30)
        with checking_every(skipping.config.deq_check_every):
            theirs, _ = FIXED_POINT_SOLVERS[name](linear, g0, 3, 1e-30, stop_mode="rel", damping=1.0, memory=5)
        assert torch.equal(ours, theirs), name


# --- site.py -----------------------------------------------------------------------------------------------------
def test_a_discrete_layer_training_with_hidden_dropout_equals_hf_bert_in_train_mode(batch):
    """HF's BertModel in train mode draws F.dropout after each branch's dense map, as `ResidualSite`
    outside a split: the same seed, the same outputs."""
    from transformers import BertModel

    from conftest import tiny_bert_config

    torch.manual_seed(0)
    hf = BertModel(tiny_bert_config(hidden_dropout_prob=0.3)).train()
    ours = bertode.from_bert(hf, mode="discrete").train()
    torch.manual_seed(7)
    expected = hf(**batch).last_hidden_state
    torch.manual_seed(7)
    got = ours(**batch).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.manual_seed(8)
    assert (ours(**batch).last_hidden_state - expected).abs().max() > 1e-2  # the draws matter here


def test_an_ode_site_training_with_dropout_is_euler_on_one_masked_branch():
    """Euler-1 on [0, 1]: LN(x + G(x) m), m = keep_mask(x, p) drawn once per solve (the seeded draw)."""
    from bertode.layers.dropout import keep_mask

    model = perturb(build(mode="ode", solver="euler", steps=1, hidden_dropout_prob=0.4).double()).train()
    site = model.encoder.layer[0].feed_forward
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    torch.manual_seed(3)
    out, _ = site(x, None, Pass(0))
    torch.manual_seed(3)
    keep = keep_mask(x, 0.4)
    torch.testing.assert_close(out, site.norm(x + site.branch(x) * keep), rtol=0, atol=1e-12)


def test_an_ode_site_solves_with_the_configured_method_backend_and_loop():
    model = build(mode="ode", solver="rk4", steps=2, sensitivity="adjoint", ode_backend="torchdiffeq",
                  fixed_step_loop="neural_ode")
    solve = model.encoder.layer[0].attention.solve
    assert (solve.ode_backend, solve.fixed_step_loop) == ("torchdiffeq", "neural_ode")
    model(**inputs()).last_hidden_state.square().sum().backward()
    assert model.solver_stats()["nfe_backward"] > 0  # the adjoint's backward solve evaluates the field


def test_a_looped_core_exiting_in_train_mode_draws_a_fresh_dropout_mask_for_its_active_rows():
    """Train mode without gradients, per-token exit of a looped core (no DEQ masks): each site draws F.dropout
    on the whole update while every token runs, on the active rows' update afterwards; written out densely."""
    import torch.nn.functional as F

    p = 0.3
    model = perturb(build(mode="discrete", weight_tying=True, hidden_dropout_prob=p).double()).train()
    batch = inputs()
    for threshold in (1.0, 0.6, 0.4, 0.3, 0.2, 0.1):  # fresh masks keep every iterate moving
        torch.manual_seed(5)
        with torch.no_grad(), bertode.dialed(depth=10, exit=bertode.make_exit_criterion("latent_diff", threshold)):
            out = model(**batch)
        depths = model.encoder.last_stats.exit_depths
        if len(set(depths[batch["attention_mask"].bool()].tolist())) > 1:
            break
    else:
        pytest.fail(f"no threshold gave tokens different exit depths: {depths.tolist()}")
    mask = sdpa_mask(batch["attention_mask"])
    layer = model.encoder.layer[0]
    torch.manual_seed(5)
    with torch.no_grad():
        z = model.embeddings(input_ids=batch["input_ids"])
        for k in range(model.encoder.last_stats.counters["depth"]):
            active = depths > k
            x = z
            for site in (layer.attention, layer.feed_forward):
                update = site.branch(x, mask) if site is layer.attention else site.branch(x)
                if bool(active.all()):
                    x = site.norm(x + F.dropout(update, p, True))
                else:
                    x = x.clone()
                    x[active] = site.norm(x[active] + F.dropout(update[active], p, True))
            z = torch.where(active[..., None], x, z)
    torch.testing.assert_close(out.last_hidden_state, z, rtol=0, atol=1e-12)


def test_site_dropout_of_a_pre_ln_layer_and_none_at_eval():
    """Pre-LN discrete site in train mode: x + F.dropout(G(LN(x))) (seeded); an ODE site at eval draws nothing."""
    import torch.nn.functional as F

    model = perturb(build(mode="discrete", norm_position="pre", hidden_dropout_prob=0.4).double()).train()
    site = model.encoder.layer[0].feed_forward
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    torch.manual_seed(3)
    out, _ = site(x, None, Pass(0))
    torch.manual_seed(3)
    torch.testing.assert_close(out, x + F.dropout(site.branch(site.norm(x)), 0.4, True), rtol=0, atol=1e-12)
    ode = perturb(build(mode="ode", solver="euler", steps=1, hidden_dropout_prob=0.4).double()).eval()
    site = ode.encoder.layer[0].feed_forward
    out, _ = site(x, None, Pass(0))
    torch.testing.assert_close(out, site.norm(x + site.branch(x)), rtol=0, atol=1e-12)


def test_a_regularised_solve_spans_its_layers_interval_at_the_dialled_steps():
    """t_end = 0.5: site i of layer l solves over [l t_end, (l + 1) t_end] with the dialled rk4 steps, under a
    regulariser too (its augmented solve), named per layer and site."""
    model = build(mode="ode", solver="rk4", steps=1, t_end=0.5, regularizer="jacobian").train()
    with bertode.dialed(depth=3):
        out = model(**inputs(), output_trajectory=True)
    names = ["layer.0.attention", "layer.0.feed_forward", "layer.1.attention", "layer.1.feed_forward"]
    assert [solve["name"] for solve in out.trajectory] == names
    for index, solve in enumerate(out.trajectory):
        expected = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]) * 0.5 + (index // 2) * 0.5
        torch.testing.assert_close(solve["times"].float(), expected)
    assert [row["name"] for row in out.solver_stats["layers"]] == names
    assert out.solver_stats["nfe_forward"] == 4 * 3 * 4


def test_a_regularised_adjoint_differentiates_the_sites_parameters_as_autograd():
    """The augmented (kinetic) solve's adjoint against autograd through rk4: all of layer 0's parameter
    gradients together within the adjoint's discretisation error (query/key alone are tiny: softmax ignores
    a key bias)."""
    grads = {}
    for sensitivity in ("autograd", "adjoint"):
        model = build(mode="ode", solver="rk4", steps=2, regularizer="kinetic", sensitivity=sensitivity,
                      regularizer_weight=0.5, initializer_range=0.02).double().train()
        out = model(**inputs())
        (out.last_hidden_state.square().mean() + model.encoder.ode_penalty).backward()
        grads[sensitivity] = torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                                        for n, p in model.named_parameters() if "encoder.layer.0" in n])
    error = (grads["adjoint"] - grads["autograd"]).norm() / grads["autograd"].norm()
    assert error <= 1e-2, error.item()


def test_the_forward_solve_takes_the_configured_rel_stop_mode_too():
    model = build(mode="deq", deq_solver="anderson", deq_stop_mode="rel", deq_damping=0.6, deq_memory=2)
    generator = torch.Generator().manual_seed(0)
    a = 0.5 * torch.randn(12, 12, generator=generator, dtype=torch.float64) / 12 ** 0.5
    f = lambda z: z @ a.T + 10 * torch.ones(3, 12, dtype=torch.float64)
    z0 = torch.zeros(3, 12, dtype=torch.float64)
    ours, info = model.encoder._solve(f, z0, "anderson", 40, 1e-6, "x")
    with checking_every(model.config.deq_check_every):
        absolute, abs_info = FIXED_POINT_SOLVERS["anderson"](f, z0, 40, 1e-6, stop_mode="abs", damping=0.6, memory=2)
        relative, rel_info = FIXED_POINT_SOLVERS["anderson"](f, z0, 40, 1e-6, stop_mode="rel", damping=0.6, memory=2)
    assert torch.equal(ours, relative) and info.iterations == rel_info.iterations != abs_info.iterations


def test_a_deq_reports_its_iterates_trajectory_and_the_solves_statistics():
    """Under ift: every iterate to the dial's on_iterate (1..n, the last one the output), the trajectory named
    deq.forward at iterations 0..n, and the forward and (non-converging) backward solves' SolveInfo in the
    statistics and counters (plain ints)."""
    model = build(mode="deq", deq_tol=1e-5, deq_max_iter=60, deq_backward_max_iter=2, deq_backward_tol=1e-12,
                  initializer_range=0.02)
    reported = {}
    with bertode.dialed(on_iterate=lambda n, z: reported.__setitem__(n, z.detach().clone())):
        out = model(**inputs(), output_trajectory=True)
    info = model.encoder.last_forward_info
    assert sorted(reported) == list(range(1, info.iterations + 1))
    (solve,) = out.trajectory
    assert solve["name"] == "deq.forward" and solve["times"].tolist() == list(range(info.iterations + 1))
    stats = model.solver_stats()
    assert stats["nfe_forward"] == stats["forward_iterations"] == info.iterations
    assert stats["forward_converged_at"] == info.converged_at
    assert stats["forward_abs_residual"] == info.worst_abs_residual
    out.last_hidden_state.square().sum().backward()
    backward = model.encoder.last_backward_info
    assert backward is not None and backward.iterations == 2 and backward.converged_fraction < 1
    stats = model.solver_stats()
    assert stats["nfe_backward"] == stats["backward_iterations"] == 2
    assert stats["backward_converged_at"] == backward.converged_at
    assert model.encoder.counters() == dict(training_forwards=1, skipped_batches=0, nonconverged_solves=1)
    model.config.deq_backward_max_iter, model.config.deq_backward_tol = 100, 1e-4
    model.encoder.sensitivity = bertode.solve.sensitivities.build_sensitivity(model.config)
    model(**inputs()).last_hidden_state.square().sum().backward()
    backward = model.encoder.last_backward_info
    assert backward.converged_at is not None and model.solver_stats()["backward_converged_at"] == backward.converged_at
    assert all(type(value) is int for value in model.encoder.counters().values())


def test_exit_with_truncated_backprop_keeps_the_graph_of_the_last_iteration_only():
    """Eval mode with gradients, exit at threshold 0 (no token leaves), backprop=1 of 4 iterations: the
    gradient of the first iterates is cut, so the parameters' gradient is that of one damped step from the
    third iterate (computed without a graph)."""
    model = perturb(build(mode="deq", deq_damping=0.8, initializer_range=0.1).double()).eval()
    batch = inputs()
    with bertode.dialed(depth=4, backprop=1, exit=bertode.make_exit_criterion("latent_diff", 0.0)):
        model(**batch).last_hidden_state.square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    encoder, mask = model.encoder, sdpa_mask(batch["attention_mask"])
    embeddings = model.embeddings(input_ids=batch["input_ids"])
    add = encoder.injection(embeddings)

    def layers(z):
        hidden = z + add
        for index, layer in enumerate(encoder.layer):
            hidden, _ = layer(hidden, mask, Pass(index))
        return 0.2 * z + 0.8 * hidden

    z = torch.zeros_like(embeddings)
    with torch.no_grad():
        for _ in range(3):
            z = layers(z)
    layers(z).square().sum().backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_bf16_deq_exits_with_an_fp32_state_and_bf16_layers():
    """A bf16 model: the state iterates in fp32 (z_{k+1} = 0.2 z_k + 0.8 Layers(z_k + U e) with the layers in
    bf16, cast up), the dial sees and the model returns bf16."""
    model = build(mode="deq", deq_damping=0.8).to(torch.bfloat16).eval()
    batch, reported = inputs(), []
    with torch.no_grad(), bertode.dialed(depth=4, exit=bertode.make_exit_criterion("latent_diff", 0.0),
                                         on_iterate=lambda n, z: reported.append(z.dtype)):
        out = model(**batch)
    assert out.last_hidden_state.dtype == torch.bfloat16 and reported == [torch.bfloat16] * 4
    assert out.hidden_states is None  # not asked for
    encoder, mask = model.encoder, sdpa_mask(batch["attention_mask"])
    with torch.no_grad():
        embeddings = model.embeddings(input_ids=batch["input_ids"])
        add, z = encoder.injection(embeddings), torch.zeros(embeddings.shape)
        for _ in range(4):
            hidden = z.to(torch.bfloat16) + add
            for index, layer in enumerate(encoder.layer):
                hidden, _ = layer(hidden, mask, Pass(index))
            z = 0.2 * z + 0.8 * hidden.float()
    torch.testing.assert_close(out.last_hidden_state, z.to(torch.bfloat16), rtol=0, atol=0)


def test_an_ode_sites_dropout_mask_takes_the_autocast_dtype():
    from bertode.layers.site import _in_compute_dtype

    mask = torch.full((2, 3), 2.0)
    assert _in_compute_dtype(mask).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _in_compute_dtype(mask).dtype == torch.bfloat16
        assert torch.equal(_in_compute_dtype(mask).float(), mask)


def test_a_bf16_deq_reads_its_kl_exit_through_the_bf16_head():
    model = build(BertODEForMaskedLM, mode="deq").to(torch.bfloat16).eval()
    with torch.no_grad():
        plain = model(**inputs()).logits
        with bertode.dialed(depth=model.config.deq_max_iter, exit=bertode.make_exit_criterion("kl", 0.0)):
            exited = model(**inputs()).logits
    assert exited.dtype == torch.bfloat16 and exited.shape == plain.shape


def test_a_sites_trajectory_outputs_are_its_norm_of_each_state_and_the_dialled_steps_count():
    """output_trajectory: a post-LN site's outputs are LN(z(t)) at each state, the last its output; at the
    dialled depth every site takes that many Euler steps (no regulariser)."""
    model = perturb(build(mode="ode", solver="euler", steps=2, vector_field="residual").double()).eval()
    with torch.no_grad(), bertode.dialed(depth=3):
        out = model(**inputs(), output_trajectory=True)
    assert out.solver_stats["nfe_forward"] == 3 * 4
    for index, solve in enumerate(out.trajectory):
        layer = model.encoder.layer[index // 2]
        site = layer.attention if index % 2 == 0 else layer.feed_forward
        assert len(solve["times"]) == 4
        with torch.no_grad():
            torch.testing.assert_close(solve["outputs"], site.norm(solve["states"]), rtol=0, atol=1e-12)
    build(mode="ode", vector_field="time_weights")  # the field binds its site's branch (its linear maps)


def test_pretraining_forwards_ignore_the_exit_and_later_ones_take_it():
    model = build(mode="deq", deq_pretrain_steps=1, deq_pretrain_depth=2).train()
    exit_dial = dict(depth=6, exit=bertode.make_exit_criterion("latent_diff", 0.0))
    with torch.no_grad(), bertode.dialed(**exit_dial):
        model(**inputs())  # the first training forward: unrolled warm-up, no exit
        stats = model.encoder.last_stats
        assert stats.records[0].extra.get("pretrain") is True and stats.exit_depths is None
        model(**inputs())  # the second: past the warm-up, the exit runs
        assert model.encoder.last_stats.exit_depths is not None
    fresh = build(mode="deq", deq_pretrain_steps=5).eval()  # at eval the warm-up never applies
    with torch.no_grad(), bertode.dialed(**exit_dial):
        fresh(**inputs())
    assert fresh.encoder.last_stats.exit_depths is not None


def test_a_deq_takes_a_batch_of_one_sequence():
    model = build(mode="deq").eval()
    one = {name: value[:1] for name, value in inputs().items()}
    with torch.no_grad():
        alone = model(**one).last_hidden_state
        both = model(**inputs()).last_hidden_state
    assert alone.shape == (1, 9, 32)
    torch.testing.assert_close(alone, both[:1], rtol=0, atol=1e-3)  # each row's own fixed point, to the tolerance


def test_a_skipped_implicit_backward_rolls_every_gradient_back():
    """A NaN cotangent makes the implicit backward's solve non-finite: with ``skip`` the batch is counted and
    every parameter's gradient is what it was before this batch (here: ones)."""
    model = build(mode="deq", deq_on_nonfinite="skip").train()
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    out = model(**inputs()).last_hidden_state
    out.register_hook(lambda grad: grad * float("nan"))
    (out.sum() + model.embeddings.word_embeddings.weight.sum()).backward()  # a path outside the solve too
    assert model.encoder.skipped_batches.item() == 1
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


@pytest.mark.parametrize("sensitivity", ["unrolled", "ift"])
def test_a_deq_reports_every_iterate_in_its_dtype_and_names_its_record(sensitivity):
    model = build(mode="deq", sensitivity=sensitivity, deq_tol=1e-30, deq_max_iter=5).to(torch.bfloat16).eval()
    reported = []
    with torch.no_grad(), bertode.dialed(on_iterate=lambda n, z: reported.append((n, z.dtype))):
        model(**inputs())
    assert reported == [(n, torch.bfloat16) for n in range(1, 6)]
    assert model.encoder.last_stats.records[0].name == "deq"


def test_an_ode_site_differentiates_only_the_dialled_last_step():
    """Euler, 4 steps of h = 1/4, backprop=1: the first three steps pass the input's gradient on unchanged
    (z3 + x - x.detach()), the last is differentiated; out = LN(z4). Written out with the site's field."""
    model = perturb(build(mode="ode", solver="euler", steps=4, vector_field="residual").double()).eval()
    site = model.encoder.layer[0].feed_forward
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 5, 32, dtype=torch.float64)
    out, _ = site(x, None, Pass(0, steps=4, backprop=1))
    (got,) = torch.autograd.grad((out * weights).sum(), x)
    with torch.no_grad():
        z = x.detach()
        for _ in range(3):
            z = z + 0.25 * site.branch(z)
    z = z + x - x.detach()
    z = z + 0.25 * site.branch(z)
    (expected,) = torch.autograd.grad((site.norm(z) * weights).sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
