"""ODE regularisers (`regularizers.py`): the kinetic energy integrated along a solve
matches a dense quadrature of ‖f‖² along the trajectory; the Hutchinson Jacobian term
averages to the dense ‖∂f/∂z‖²_F; autograd and the adjoint integrate the same values;
the penalty reaches the loss and its gradient; it is a CLI group; off outside training."""

import torch

import bertode
from bertode import analysis

IDS = torch.tensor([[2, 7, 11, 5, 3], [2, 9, 4, 6, 3]])


def _model(**fields):
    torch.manual_seed(0)
    config = bertode.BertODEConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **fields)
    model = bertode.BertODEModel(config).double().train()
    for p in model.encoder.parameters():
        p.data.mul_(3)
    return model


def test_kinetic_energy_matches_a_dense_quadrature_and_autograd_equals_adjoint():
    values = {}
    for sensitivity in ("autograd", "adjoint"):
        model = _model(solver="dopri5", atol=1e-9, rtol=1e-9, sensitivity=sensitivity, regularizer="kinetic")
        out = model(input_ids=IDS)
        values[sensitivity] = out.solver_stats["kinetic_energy"]
        assert model.encoder.ode_penalty.requires_grad
    assert abs(values["autograd"] - values["adjoint"]) <= 1e-4 * abs(values["autograd"]), values
    # dense reference: ‖f‖² / hidden along a fine RK4 trajectory of each site, trapezoid rule, per sequence
    model = _model(solver="rk4", steps=1).eval()
    total = 0.0
    for site in ("attention", "feed_forward"):
        per_sequence = []
        for row in range(IDS.shape[0]):
            f, z, t0, t1 = analysis.site_dynamics(model, IDS[row:row + 1], 0, site)
            n = 400
            h = (t1 - t0) / n
            samples = []
            for k in range(n + 1):
                dz = f(t0 + k * h, z)
                samples.append(dz.view(-1, 8).pow(2).mean(-1).mean().item())  # mean over hidden, then tokens
                if k < n:
                    k1 = f(t0 + k * h, z)
                    k2 = f(t0 + k * h + h / 2, z + h / 2 * k1)
                    k3 = f(t0 + k * h + h / 2, z + h / 2 * k2)
                    k4 = f(t0 + k * h + h, z + h * k3)
                    z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            per_sequence.append(h * (sum(samples) - (samples[0] + samples[-1]) / 2))
        total += sum(per_sequence) / len(per_sequence)
    assert abs(values["autograd"] - total) <= 1e-4 * total, (values, total)


def test_the_hutchinson_jacobian_term_averages_to_the_dense_frobenius_norm():
    model = _model(solver="euler", steps=1, regularizer="jacobian")  # one Euler step: the integrand at t0
    draws = [model(input_ids=IDS[:1]).solver_stats["jacobian_frobenius"] for _ in range(400)]
    estimate = sum(draws) / len(draws)
    dense = 0.0
    for site in ("attention", "feed_forward"):
        f, z, t0, _ = analysis.site_dynamics(model.eval(), IDS[:1], 0, site)
        jacobian = torch.autograd.functional.jacobian(lambda v: f(t0, v), z)
        dense += jacobian.pow(2).sum().item() / z.numel()  # ‖J‖²_F / (tokens x hidden)
        model.train()
    assert len(set(draws)) > 10  # a fresh ε per solve
    assert abs(estimate - dense) <= 0.1 * dense, (estimate, dense)


def test_the_penalty_is_in_the_loss_and_its_gradient():
    plain = bertode.BertODEForMaskedLM(_model(solver="rk4", steps=2).config)
    regularised = bertode.BertODEForMaskedLM(_model(solver="rk4", steps=2, regularizer="rnode",
                                                    regularizer_weight=0.5).config)
    regularised.load_state_dict(plain.state_dict())
    plain.train(), regularised.train()
    labels = IDS.clone()
    a, b = plain(input_ids=IDS, labels=labels), regularised(input_ids=IDS, labels=labels)
    penalty = regularised.base_model.encoder.ode_penalty
    assert penalty is not None and penalty.item() > 0
    assert abs(b.loss.item() - a.loss.item() - 0.5 * penalty.item()) <= 1e-5
    assert b.solver_stats["kinetic_energy"] > 0 and b.solver_stats["jacobian_frobenius"] > 0
    b.loss.backward()
    assert all(p.grad is not None for p in regularised.base_model.encoder.parameters())
    regularised.eval()
    with torch.no_grad():
        assert "kinetic_energy" not in regularised(input_ids=IDS).solver_stats  # off outside training


def test_the_regularizer_group_composes_and_is_refused_outside_ode_mode():
    from bertode.train import compose
    from bertode.training.run_config import build_model_config

    config = build_model_config(compose(["regularizer=rnode", "regularizer.weight=0.1"]), vocab_size=50)
    assert config.regularizer == "rnode" and config.regularizer_weight == 0.1
    for fields, expected in (({"mode": "deq", "regularizer": "kinetic"}, "regularizer='kinetic' is invalid with"),
                             ({"regularizer": "lasso"}, "regularizer='lasso' is invalid"),
                             ({"regularizer_weight": -1.0}, "regularizer_weight=-1.0 is invalid")):
        try:
            bertode.BertODEConfig(**fields).validate_ode()  # pairings are checked when a model is built
        except ValueError as error:
            assert expected in str(error) and "\n" not in str(error)
        else:
            raise AssertionError(fields)


def test_kinetic_regularisation_keeps_an_adaptive_solver_cheap_at_equal_loss(tmp_path):
    """Training a dopri5 model stiffens its flow: without a penalty the forward NFE grows,
    with the kinetic penalty it stays low, at the same eval loss (same data, seed and
    budget; CPU). Measured: 200 against 74 forward NFE over steps 81-100, eval loss 5.735
    against 5.725."""
    import json

    from bertode.train import compose, train

    common = [f"data.cache_dir={tmp_path / 'cache'}", "solver=dopri5", "solver.atol=1e-4", "solver.rtol=1e-4",
              "solver.t_end=2", "trainer.max_steps=100", "model.hidden_size=32", "model.intermediate_size=64",
              "model.num_attention_heads=2", "data.seq_len=32", "data.vocab_size=500", "trainer.lr=1e-2",
              "trainer.batch_size=16", "trainer.log_every=50", "trainer.eval_every=1000",
              "model.hidden_dropout_prob=0", "data.max_eval_sequences=64"]
    nfe, loss = {}, {}
    for name in ("none", "kinetic"):
        result = train(compose([*common, f"regularizer={name}", "regularizer.weight=0.1"]), tmp_path / name)
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        last = [r["nfe_forward"] for r in records if r["kind"] == "train"][-20:]
        nfe[name], loss[name] = sum(last) / len(last), result["eval"]["loss"]
    print(f"forward NFE, steps 81-100: {nfe}; eval loss: {loss}")
    assert nfe["kinetic"] < 0.8 * nfe["none"], nfe
    assert abs(loss["kinetic"] - loss["none"]) <= 0.1, loss


# `augmented` on a linear field written here, f(t, z) = t z A, whose εᵀ ∂f/∂z = t ε Aᵀ (issue 29's mutation run).

def _linear_field(width=6):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(width, width, generator=generator, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, width, generator=generator, dtype=torch.float64)
    state = torch.randn(2, 3, width + 2, generator=generator, dtype=torch.float64)
    return a, noise, state, (lambda t, z: t * z @ a)


def test_the_augmented_state_carries_the_closed_form_integrands_and_their_gradients():
    from bertode.layers.regularizers import REGULARIZERS, augmented

    a, noise, state, field = _linear_field()
    t = torch.tensor(0.7, dtype=torch.float64)
    z = state[..., :6]
    dynamics = augmented(field, REGULARIZERS["rnode"](), noise, 6)
    kinetic = (t * z @ a).pow(2).mean(-1)
    jacobian = (t * noise @ a.T).pow(2).mean(-1)
    with torch.no_grad():  # an adjoint's forward solve: values only
        out = dynamics(t, state)
    assert not out.requires_grad
    torch.testing.assert_close(out, torch.cat([t * z @ a, kinetic[..., None], jacobian[..., None]], -1).detach())
    # building a graph: the penalty's gradient reaches the field's weights, the state's reaches the state
    state.requires_grad_()
    out = dynamics(t, state)
    (grad_a,) = torch.autograd.grad(out[..., 7].sum(), a, retain_graph=True)
    torch.testing.assert_close(grad_a, torch.autograd.grad(jacobian.sum(), a)[0])
    (grad_state,) = torch.autograd.grad(out[..., :6].sum(), state)
    torch.testing.assert_close(grad_state[..., :6], (t * torch.ones(2, 3, 6, dtype=torch.float64) @ a.T).detach())
    # without the Jacobian: the field at this t and the kinetic energy
    with torch.no_grad():
        out = augmented(field, REGULARIZERS["kinetic"](), None, 6)(t, state)
    torch.testing.assert_close(out, torch.cat([t * z @ a, kinetic[..., None]], -1).detach())


def test_a_user_integrand_of_another_dtype_is_cast_to_the_states():
    from bertode.layers.regularizers import Regularizer, augmented

    class Float64Energy(Regularizer):
        names = ("energy",)

        def integrands(self, dz, noise_jacobian):
            return [dz.double().pow(2).mean(-1)]

    a, noise, state, _ = _linear_field()
    field = lambda t, z: z @ a.float()  # noqa: E731
    for uses_jacobian in (False, True):
        regularizer = Float64Energy()
        regularizer.uses_jacobian = uses_jacobian
        with torch.no_grad():
            out = augmented(field, regularizer, noise.float(), 6)(torch.tensor(0.0), state.float())
        assert out.dtype == torch.float32, uses_jacobian


def test_the_rnode_integrands_are_the_kinetic_and_jacobian_ones():
    from bertode.layers.regularizers import REGULARIZERS

    dz, noise_jacobian = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    kinetic, jacobian = REGULARIZERS["rnode"]().integrands(dz, noise_jacobian)
    torch.testing.assert_close(kinetic, (dz * dz).sum(-1) / 4)
    torch.testing.assert_close(jacobian, (noise_jacobian * noise_jacobian).sum(-1) / 4)


def test_registering_a_regulariser_keeps_the_default():
    from bertode.layers.regularizers import REGULARIZERS

    @bertode.register_regularizer("registered_test_penalty")
    class Penalty(bertode.layers.regularizers.Kinetic):
        pass

    try:
        assert REGULARIZERS["registered_test_penalty"] is Penalty and REGULARIZERS.default == "none"
    finally:
        REGULARIZERS._entries.pop("registered_test_penalty", None)
        REGULARIZERS.default = "none"
