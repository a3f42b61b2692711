"""`bertode.analysis` against dense references on tiny models: Jacobian eigenvalues and
singular values of an ODE site's field (Arnoldi/Lanczos on JVPs against
`torch.autograd.functional.jacobian` + `torch.linalg`), Lyapunov exponents of a linear
field (its eigenvalues' real parts), per-token exponents, and a DEQ's spectral radius."""

import torch

import bertode
from bertode import analysis


def _model(**fields):
    torch.manual_seed(0)
    config = bertode.BertODEConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **fields)
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
