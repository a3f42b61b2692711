"""bf16 autocast leaves later fp32 solves untouched; solver statistics count what ran."""

import torch

import bertode
from conftest import projection_loss, tiny_ode_config


def _model(**config):
    torch.manual_seed(0)
    return bertode.BertODEModel(tiny_ode_config(**config)).eval()


def test_bf16_autocast_then_fp32_equals_a_fresh_model():
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    used, fresh = _model(solver="dopri5", atol=1e-5, rtol=1e-5), _model(solver="dopri5", atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = used(ids).last_hidden_state
        assert low.dtype == torch.float32  # the ODE state stays fp32 under autocast
        after = used(ids).last_hidden_state
        after_nfe = used.solver_stats()["nfe_forward"]
        reference = fresh(ids).last_hidden_state
        reference_nfe = fresh.solver_stats()["nfe_forward"]
    assert torch.equal(after, reference)
    assert after_nfe == reference_nfe
    # and the shared tableau of the fp32 solver was never converted
    solve = used.encoder.layer[0].attention.solve
    forward_solver = solve.solver(solve.spec, torch.float32, torch.device("cpu"), False)
    assert forward_solver.tableau[0].dtype == torch.float32


def test_fixed_step_counts():
    model = _model(solver="rk4", steps=3)
    model(torch.randint(0, 64, (2, 6)))
    stats = model.solver_stats()
    assert [row["name"] for row in stats["layers"]] == [
        "layer.0.attention", "layer.0.feed_forward", "layer.1.attention", "layer.1.feed_forward"]
    assert all(row["nfe_forward"] == 12 and row["accepted_steps"] == 3 for row in stats["layers"])
    assert stats["nfe_forward"] == 48 and stats["nfe_backward"] == 0


def test_adaptive_counts_and_backward_nfe_are_reset_per_batch():
    model = _model(solver="dopri5", atol=1e-6, rtol=1e-6, sensitivity="adjoint").train()
    ids = torch.randint(0, 64, (2, 6))
    projection_loss(model(ids).last_hidden_state).backward()
    stats = model.solver_stats()
    for row in stats["layers"]:
        # dopri5: 6 evaluations per attempted step (FSAL) plus the first and the initial-step probe
        attempts = row["accepted_steps"] + row["rejected_steps"]
        assert row["accepted_steps"] >= 1 and row["nfe_forward"] == 6 * attempts + 2
        assert row["nfe_backward"] > 0
    model(ids)  # next batch, before its backward
    assert model.solver_stats()["nfe_backward"] == 0


def test_weight_tying_reuses_one_layer():
    tied = _model(weight_tying=True, num_hidden_layers=3)
    assert len(tied.encoder.layer) == 1
    tied(torch.randint(0, 64, (1, 5)))
    assert len(tied.solver_stats()["layers"]) == 6
    untied = _model(num_hidden_layers=3)
    assert sum(p.numel() for p in untied.encoder.parameters()) == 3 * sum(p.numel() for p in tied.encoder.parameters())


def test_bf16_model_then_fp32_keeps_solvers_per_dtype():
    """A bf16-weight model solves in bf16 (adaptive steps included), then fp32 is untouched."""
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(6))
    used, fresh = _model(solver="dopri5", atol=1e-4, rtol=1e-4), _model(solver="dopri5", atol=1e-4, rtol=1e-4)
    fresh.to(torch.bfloat16).to(torch.float32)  # the same rounded weights, never run in bf16
    with torch.no_grad():
        low = used.to(torch.bfloat16)(ids).last_hidden_state
        assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
        after = used.to(torch.float32)(ids).last_hidden_state
        assert torch.equal(after, fresh(ids).last_hidden_state)
        assert used.solver_stats()["nfe_forward"] == fresh.solver_stats()["nfe_forward"]
