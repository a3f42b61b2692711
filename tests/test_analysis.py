"""`bertode.analysis` against dense references on tiny models: Jacobian eigenvalues and
singular values of an ODE site's field (Arnoldi/Lanczos on JVPs against
`torch.autograd.functional.jacobian` + `torch.linalg`), Lyapunov exponents of a linear
field (its eigenvalues' real parts), per-token exponents, and a DEQ's spectral radius;
`dynamics_probe` (issue 24) against dense oracles: a looped core's one-application spectral
radius, a DEQ's at z*, an ODE model's first attention flow's exponent (the RK4 flow map's
dense Jacobian)."""

import torch

import bertode
from bertode import analysis


def _model(**fields):
    torch.manual_seed(0)
    config = bertode.BertODEConfig(vocab_size=40, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                                   max_position_embeddings=16, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **{"num_hidden_layers": 2, **fields})
    model = bertode.BertODEModel(config).double().eval()
    for p in model.encoder.parameters():
        p.data.mul_(4)  # dynamics worth reading
    return model


IDS = torch.tensor([[2, 7, 11, 5, 3]])


def _dense(f, z, t=0.3):
    return torch.autograd.functional.jacobian(lambda v: f(t, v), z)


def test_spectra_of_a_site_field_match_the_dense_jacobian():
    model = _model(solver="rk4", steps=2)
    for layer, site in ((0, "attention"), (1, "feed_forward")):
        f, z0, t0, t1 = analysis.site_dynamics(model, IDS, layer, site)
        assert (t0, t1) == (layer, layer + 1) and z0.numel() == 5 * 8
        jacobian = _dense(f, z0)
        dense_eig = torch.linalg.eigvals(jacobian)
        dense_eig = dense_eig[dense_eig.abs().argsort(descending=True)][:4]
        eig = analysis.eigenvalues(f, z0, k=4, t=0.3, krylov=40)
        assert torch.allclose(eig.abs(), dense_eig.abs(), atol=1e-4), (eig, dense_eig)
        dense_sv = torch.linalg.svdvals(jacobian)[:4]
        sv = analysis.singular_values(f, z0, k=4, t=0.3, krylov=40)
        assert torch.allclose(sv, dense_sv, atol=1e-4, rtol=1e-4), (sv, dense_sv)
        assert dense_sv[0] > 0.01  # not a trivial field


def test_lyapunov_exponents_of_a_linear_field_are_its_eigenvalues_real_parts():
    # A normal matrix: a rotation-scaling block (eigenvalues 0.3 ± 2i) and decays -0.5, -1.2.
    a = torch.zeros(4, 4, dtype=torch.float64)
    a[:2, :2] = torch.tensor([[0.3, -2.0], [2.0, 0.3]])
    a[2, 2], a[3, 3] = -0.5, -1.2
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    matrix = q @ a @ q.T  # the same spectrum in another basis

    def f(t, z):
        return matrix @ z

    exponents = analysis.lyapunov_exponents(f, torch.ones(4, dtype=torch.float64), 0.0, 200.0, steps=2000, k=4)
    assert torch.allclose(exponents, torch.tensor([0.3, 0.3, -0.5, -1.2], dtype=torch.float64), atol=2e-2), exponents


def test_token_lyapunov_of_a_linear_field_is_the_stretch_of_each_token_block():
    blocks = torch.tensor([0.4, -0.2, 0.1], dtype=torch.float64)  # token i's vectors grow like exp(blocks[i] t)

    def f(t, z):
        return (z.view(3, 2) * blocks[:, None]).reshape(-1)

    exponents = analysis.token_lyapunov(f, torch.ones(6, dtype=torch.float64), 0.0, 2.0, (1, 3, 2), steps=20)
    assert torch.allclose(exponents, blocks, atol=1e-6), exponents


def test_token_lyapunov_on_a_model_site_runs_per_token():
    model = _model(solver="rk4", steps=2)
    f, z0, t0, t1 = analysis.site_dynamics(model, IDS, 0, "attention")
    exponents = analysis.token_lyapunov(f, z0, t0, t1, (1, 5, 8), steps=4)
    assert exponents.shape == (5,) and torch.isfinite(exponents).all()
    # a token's perturbations are some of all perturbations: none stretches more than the whole state's
    whole = analysis.token_lyapunov(f, z0, t0, t1, (1, 1, 40), steps=4)[0]
    assert exponents.max().item() <= whole.item() + 1e-9 and exponents.min().item() < whole.item()


def test_deq_spectral_radius_matches_the_dense_value():
    torch.manual_seed(0)
    config = bertode.BertODEConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                   mode="deq", deq_tol=1e-10, deq_max_iter=200)
    model = bertode.BertODEModel(config).double().eval()
    radius = analysis.deq_spectral_radius(model, IDS, krylov=40)
    encoder = model.encoder
    with analysis.eager_attention(model), torch.no_grad():
        embeddings = model.embeddings(input_ids=IDS)
        z_star = model(input_ids=IDS).last_hidden_state.reshape(1, -1).double()
        f = encoder.layer_map(embeddings, None, torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: f(v.view(1, -1)).reshape(-1), z_star.reshape(-1))
    dense = torch.linalg.eigvals(jacobian).abs().max().item()
    assert abs(radius - dense) <= 1e-4 * max(1.0, dense), (radius, dense)


# --- dynamics_probe (issue 24: what the training loop logs every trainer.dynamics_every steps) ---

def _looped_oracle(model, ids):
    """The looped core's states z_1..z_T (reported per iterate) and its step, written out by hand."""
    from bertode.layers.encoder import Pass
    from bertode.solve.dial import dialed

    encoder = model.encoder
    states = []
    with torch.no_grad(), analysis.eager_attention(model), dialed(on_iterate=lambda n, z: states.append(z.clone())):
        model(input_ids=ids)
        embeddings = model.embeddings(input_ids=ids)
        injected = encoder.injection(embeddings) if encoder.injection is not None else None
    shape, last = states[-1].shape, len(states) - 1

    def step(flat):
        z = flat.view(shape)
        with analysis.eager_attention(model):
            return encoder.layer[0](z + injected if injected is not None else z, None, Pass(last))[0].reshape(-1)

    return states, step


def test_dynamics_probe_of_a_looped_core_is_the_dense_spectral_radius_of_one_application():
    # Bound: relative 1e-6 (Arnoldi's Krylov space is the whole state, 5 x 8 = 40: exact up to
    # round-off; the issue asks 1e-3). Both injections; the model's training mode is kept.
    for injection in (None, "add"):
        model = _model(mode="discrete", weight_tying=True, num_hidden_layers=3, core_injection=injection)
        states, step = _looped_oracle(model, IDS)
        assert len(states) == 3
        with torch.no_grad():  # the hand-written step is the model's: z_3 = step(z_2)
            assert torch.allclose(step(states[1].reshape(-1)), states[2].reshape(-1), atol=1e-12)
        dense = torch.linalg.eigvals(torch.autograd.functional.jacobian(step, states[-1].reshape(-1))).abs().max().item()
        model.train()
        probe = analysis.dynamics_probe(model, IDS.repeat(2, 1), krylov=40)  # reads the first sequence
        assert model.training and all(p.grad is None for p in model.parameters())
        assert set(probe) == {"spectral_radius"} and dense > 0.05
        assert abs(probe["spectral_radius"] - dense) <= 1e-6 * dense, (injection, probe, dense)


def test_dynamics_probe_of_a_deq_is_the_dense_spectral_radius_at_its_fixed_point():
    torch.manual_seed(0)
    config = bertode.BertODEConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                   mode="deq", deq_tol=1e-10, deq_max_iter=200)
    model = bertode.BertODEModel(config).double().eval()
    with analysis.eager_attention(model), torch.no_grad():
        embeddings = model.embeddings(input_ids=IDS)
        z_star = model(input_ids=IDS).last_hidden_state.reshape(1, -1).double()
        f = model.encoder.layer_map(embeddings, None, torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: f(v.view(1, -1)).reshape(-1), z_star.reshape(-1))
    dense = torch.linalg.eigvals(jacobian).abs().max().item()
    probe = analysis.dynamics_probe(model, IDS, krylov=40)
    assert set(probe) == {"spectral_radius"} and abs(probe["spectral_radius"] - dense) <= 1e-6 * max(1.0, dense)


def test_dynamics_probe_of_an_ode_model_is_the_top_lyapunov_exponent_of_the_first_attention_flow():
    # Oracle: the dense Jacobian Φ of the RK4 flow map z0 -> z(t1) of the first attention site
    # (the same 4 steps): with one tangent vector q0 the exponent is log|Φ q0| / T exactly, and
    # it is at most the top singular value's log σ_max(Φ) / T.
    model = _model(solver="rk4", steps=2)
    f, z0, t0, t1 = analysis.site_dynamics(model, IDS, 0, "attention")
    steps, h = 4, (t1 - t0) / 4

    def flow(z):
        t = t0
        for _ in range(steps):
            k1 = f(t, z)
            k2 = f(t + h / 2, z + h / 2 * k1)
            k3 = f(t + h / 2, z + h / 2 * k2)
            k4 = f(t + h, z + h * k3)
            z, t = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
        return z

    phi = torch.autograd.functional.jacobian(flow, z0)
    q0 = torch.linalg.qr(torch.randn(z0.numel(), 1, generator=torch.Generator().manual_seed(0), dtype=z0.dtype))[0]
    expected = ((phi @ q0).norm().log() / (t1 - t0)).item()
    probe = analysis.dynamics_probe(model, IDS, steps=steps, k=1)
    assert set(probe) == {"lyapunov_max"}
    assert abs(probe["lyapunov_max"] - expected) <= 1e-8 * max(1.0, abs(expected)), (probe, expected)
    assert probe["lyapunov_max"] <= (torch.linalg.matrix_norm(phi, ord=2).log() / (t1 - t0)).item() + 1e-9


def test_dynamics_probe_refuses_a_model_without_dynamics():
    import pytest

    with pytest.raises(ValueError, match="mode='discrete' with untied layers"):
        analysis.dynamics_probe(_model(mode="discrete"), IDS)
