"""Per-sequence adaptive solves (``ode_backend`` ``bertode`` and ``torchode``) against oracles:
the same sequence solved alone, torchdiffeq per sequence in float64, autograd through
torchdiffeq, and the shared-step backend (torchdyn) as the contrast."""

import math

import pytest
import torch
import torchdiffeq

import bertode
from bertode.solve.host_syncs import count_host_syncs
from conftest import projection_loss, tiny_ode_config

# The stiff sequence's branch output is this much larger (as a per-row hidden-dropout mask would
# scale it): its field is larger and changes faster, so it needs more steps.
ROW_SCALE = torch.tensor([1.0, 1.0, 10.0], dtype=torch.float64).view(3, 1, 1)


def _site(vector_field="time_residual", **config):
    """A float64 feed-forward site with a non-autonomous field (t matters), and its dynamics."""
    torch.manual_seed(0)
    kwargs = dict(max_frequency=4.0) if vector_field in ("time_residual", "time_weights") else None
    config = dict(dict(solver="dopri5", vector_field=vector_field, vector_field_kwargs=kwargs), **config)
    model = bertode.BertODEModel(tiny_ode_config(num_hidden_layers=1, **config)).double().eval()
    site = model.encoder.layer[0].feed_forward
    with torch.no_grad():
        for name, p in site.field.named_parameters():
            if "time_proj" in name or "generator" in name:  # make the field depend on t (they start at zero)
                p.copy_(0.1 * torch.randn_like(p))
        for p in site.branch.parameters():
            if p.dim() == 2:  # larger weights than BERT's init: dynamics far from the identity
                p.mul_(5.0)

    def dynamics(t, z):  # rows are sequences of the batch (3) or one of them alone (its scale)
        scale = ROW_SCALE if z.shape[0] == 3 else ROW_SCALE[dynamics.row]
        return site.field(t, z, lambda h: scale * site.branch(h, None), site.norm)

    dynamics.row = 0
    return site, dynamics



def _stiff_batch():
    return torch.randn(3, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _alone(dynamics, i):
    dynamics.row = i
    return dynamics


def _solve(site, dynamics, x, **options):
    return site.solve(x, dynamics, site.dynamics_parameters(), 0.0, 1.0, **options)


def test_a_sequence_is_solved_alone_as_in_a_stiff_batch():
    site, dynamics = _site(ode_backend="bertode", atol=1e-6, rtol=1e-6)
    x = _stiff_batch()
    with torch.no_grad():
        batch_z, batch_record = _solve(site, dynamics, x)
        alone = [_solve(site, _alone(dynamics, i), x[i:i + 1]) for i in range(3)]
    batch_nfe = batch_record.per_sequence["nfe"].tolist()
    for i, (z, record) in enumerate(alone):
        assert (batch_z[i] - z[0]).abs().max() <= 1e-9 * z.abs().max()  # batched matmuls round differently
        assert batch_nfe[i] == record.nfe_forward  # exactly: the row's steps do not depend on its batch
        assert batch_record.per_sequence["accepted"][i] == record.per_sequence["accepted"][0]
    assert batch_nfe[2] > 2 * batch_nfe[0]  # the stiff sequence needs more evaluations
    assert batch_record.nfe_forward == max(batch_nfe)  # the batch runs as long as its slowest row

    shared, dynamics = _site(ode_backend="torchdyn", atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        _, shared_batch = _solve(shared, dynamics, x)
        _, shared_alone = _solve(shared, _alone(dynamics, 0), x[:1])
    # One step size for the batch: the easy sequence takes the stiff one's steps.
    assert shared_batch.nfe_forward >= 2 * shared_alone.nfe_forward


@pytest.mark.parametrize("backend,solver,vector_field", [
    ("bertode", "dopri5", "time_residual"), ("bertode", "tsit5", "time_weights"), ("bertode", "dopri5", "add_norm"),
    ("torchode", "dopri5", "time_residual"), ("torchode", "tsit5", "time_weights"),
])
def test_each_sequence_matches_torchdiffeq_alone(backend, solver, vector_field):
    site, dynamics = _site(vector_field, ode_backend=backend, solver=solver, atol=1e-8, rtol=1e-8)
    x = _stiff_batch()
    with torch.no_grad():
        ours, record = _solve(site, dynamics, x)
        t_span = torch.tensor([0.0, 1.0], dtype=torch.float64)
        reference = torch.cat([torchdiffeq.odeint(_alone(dynamics, i), x[i:i + 1], t_span, method="dopri5",
                                                  atol=1e-11, rtol=1e-11)[-1] for i in range(3)])
    assert (ours - x).abs().amax(dim=(1, 2)).min() > 1e-2  # every sequence moved
    error = (ours - reference).abs().amax(dim=(1, 2)) / reference.abs().amax(dim=(1, 2))
    assert error.max() <= 1e-6, error  # the tolerance's order (global error ~ 10-100 x rtol)
    accepted = record.per_sequence["accepted"].tolist()
    assert accepted[2] > accepted[0] >= 1


def test_torchode_agrees_with_bertode_per_sequence():
    x = _stiff_batch()
    solutions, steps = {}, {}
    for backend in ("bertode", "torchode"):
        site, dynamics = _site(ode_backend=backend, atol=1e-8, rtol=1e-8)
        with torch.no_grad():
            solutions[backend], record = _solve(site, dynamics, x)
        steps[backend] = record.per_sequence["accepted"].tolist()
    scale = solutions["bertode"].abs().amax(dim=(1, 2))
    assert ((solutions["bertode"] - solutions["torchode"]).abs().amax(dim=(1, 2)) / scale).max() <= 1e-6
    for ours, theirs in zip(steps["bertode"], steps["torchode"]):  # the same controller, up to the first step
        assert abs(ours - theirs) <= max(2, theirs // 10)


BURST_CENTERS, BURST_HEIGHT, BURST_WIDTH = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64), 40.0, 0.03


def _burst(t, z):
    """dz/dt = -(1 + A exp(-((t - c_i) / w)^2)) z: sequence i decays fast around its own time c_i."""
    centers = BURST_CENTERS.view(-1, 1, 1)
    return -(1 + BURST_HEIGHT * torch.exp(-((t - centers) / BURST_WIDTH) ** 2)) * z


def _burst_exact(z0, t1=1.0):
    centers = BURST_CENTERS.view(-1, 1, 1)
    erf = torch.erf((t1 - centers) / BURST_WIDTH) - torch.erf(-centers / BURST_WIDTH)
    return z0 * torch.exp(-(t1 + BURST_HEIGHT * BURST_WIDTH * math.sqrt(math.pi) / 2 * erf))


def test_rejected_steps_retry_from_where_they_were_against_the_closed_form():
    z0 = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    attempts, counts = {}, {}
    for backend in ("bertode", "torchode"):
        solve = bertode.solve.ode.ODESolve("dopri5", atol=1e-6, rtol=1e-6, ode_backend=backend)
        z1, record = solve(z0, _burst, [], 0.0, 1.0)
        error = (z1 - _burst_exact(z0)).abs().amax(dim=(1, 2)) / z0.abs().amax(dim=(1, 2))
        assert error.max() <= 2e-6, (backend, error)
        counts[backend] = record.per_sequence
        assert (counts[backend]["rejected"] > 0).all()  # every sequence ran into its burst and stepped back
        attempts[backend] = (counts[backend]["accepted"] + counts[backend]["rejected"]).tolist()
    # FSAL: 6 evaluations per attempt plus two to choose the first step, counted per sequence
    assert counts["bertode"]["nfe"].tolist() == [2 + 6 * n for n in attempts["bertode"]]
    for ours, theirs in zip(attempts["bertode"], attempts["torchode"]):  # the same kind of controller
        assert abs(ours - theirs) <= 4, attempts


def test_gradient_matches_torchdiffeq_and_the_rows_solved_alone():
    site, dynamics = _site(ode_backend="bertode", atol=1e-8, rtol=1e-8)
    x = _stiff_batch().requires_grad_()
    parameters = site.dynamics_parameters()
    z, _ = _solve(site, dynamics, x)
    ours = torch.autograd.grad(projection_loss(z), [x, *parameters])

    t_span = torch.tensor([0.0, 1.0], dtype=torch.float64)
    reference = torchdiffeq.odeint(dynamics, x, t_span, method="dopri5", atol=1e-11, rtol=1e-11)[-1]
    expected = torch.autograd.grad(projection_loss(reference), [x, *parameters])
    for mine, theirs in zip(ours, expected):
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()

    # Row by row alone, with the same weights of the loss: the same steps, so the same gradient to rounding.
    weights = torch.linspace(-1.0, 1.0, z.numel(), dtype=z.dtype).view_as(z)
    alone = [torch.zeros_like(g) for g in ours]
    for i in range(3):
        zi, _ = _solve(site, _alone(dynamics, i), x[i:i + 1])
        for total, g in zip(alone, torch.autograd.grad((zi * weights[i:i + 1]).sum(), [x, *parameters])):
            total += g
    for mine, theirs in zip(ours, alone):
        assert (mine - theirs).abs().max() <= 1e-7 * theirs.abs().max()  # rounding, amplified


def test_one_host_sync_per_attempted_step_and_the_stats_per_sequence():
    site, dynamics = _site(ode_backend="bertode", atol=1e-6, rtol=1e-6)
    x = _stiff_batch()
    with torch.no_grad(), count_host_syncs() as syncs:
        _, record = _solve(site, dynamics, x)
    attempts = record.per_sequence["accepted"] + record.per_sequence["rejected"]
    assert syncs.count == int(attempts.max()), syncs.by_op  # the loop's one flag read per iteration
    row = record.as_dict()
    assert row["accepted_per_sequence"] == record.per_sequence["accepted"].tolist()
    assert row["nfe_per_sequence"][2] == row["nfe_forward"]
    assert (row["accepted_steps"], row["rejected_steps"]) == (max(row["accepted_per_sequence"]),
                                                            max(row["rejected_per_sequence"]))


def test_the_model_reports_steps_per_sequence(batch):
    torch.manual_seed(0)
    config = tiny_ode_config(solver="dopri5", ode_backend="bertode", atol=1e-5, rtol=1e-5)
    model = bertode.BertODEModel(config).double().eval()
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
        stats = model.solver_stats()
    reference_model = bertode.BertODEModel(tiny_ode_config(solver="dopri5", atol=1e-9, rtol=1e-9)).double().eval()
    reference_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference = reference_model(**batch).last_hidden_state
    assert (ours - reference).abs().max() <= 1e-3
    layers = stats["layers"]
    assert len(layers) == 4 and all(len(row["accepted_per_sequence"]) == 2 for row in layers)
    assert all(max(row["nfe_per_sequence"]) == row["nfe_forward"] for row in layers)
    assert bertode.BertODEConfig.from_dict(config.to_dict()).ode_backend == "bertode"  # saved with the model


def test_the_step_bound_raises_naming_the_sequence():
    site, dynamics = _site(ode_backend="bertode", atol=1e-10, rtol=1e-10)
    site.solve.max_steps = 5
    with pytest.raises(RuntimeError, match=r"took 5 steps on sequence\(s\) \[.*2\]"):
        with torch.no_grad():
            _solve(site, dynamics, _stiff_batch())


@pytest.mark.parametrize("overrides,field", [
    (dict(ode_backend="torchode", solver="rk4"), "solver"),
    (dict(ode_backend="bertode", solver="dopri5", sensitivity="adjoint"), "sensitivity"),
    (dict(ode_backend="torchode", solver="dopri5", sensitivity="adjoint"), "sensitivity"),
    (dict(ode_backend="bertode", solver="dopri5", vector_field="autonomous_only"), "vector_field"),
])
def test_refusals_name_the_field(overrides, field):
    @bertode.register_vector_field("autonomous_only")
    class AutonomousOnly(bertode.layers.vector_fields.ResidualField):
        per_sequence_time = False

    try:
        with pytest.raises(ValueError, match=rf"^BertODEConfig\.{field}=.* is invalid.*allowed: ") as error:
            tiny_ode_config(**overrides).validate_ode()
        assert "\n" not in str(error.value)
    finally:
        bertode.layers.vector_fields.VECTOR_FIELDS._entries.pop("autonomous_only", None)
