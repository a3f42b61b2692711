"""Fixed-step solves as one torchdyn step (`bertode/substeps.py`): same numbers as
torchdyn's own grid loop, adjoint memory flat in the steps, no device synchronisation.

"No synchronisation" is checked on the meta device: a meta tensor has no data, so any
read of a device value on the host (``.item()``, ``bool(tensor)``, ``if tensor:``) raises;
and a dispatch mode counts copies of host tensors onto the device (blocking on CUDA). A
fixed-step training step with neither never waits on a GPU inside its solves (the
adjoint's backward does, inside torchdyn).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchdyn.numerics.odeint import odeint
from torchdyn.numerics.solvers.ode import SOLVER_DICT

import bertode
from bertode.solve.substeps import SubSteps
from conftest import projection_loss, tiny_ode_config


def _field(t, x):
    return torch.tanh(x @ _field.weight) * torch.cos(3 * t) - 0.5 * x


_field.weight = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_substeps_equal_torchdyns_grid_loop(solver, steps):
    x0 = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = torch.linspace(0.2, 1.4, steps + 1, dtype=torch.float64)
    _, reference = odeint(_field, x0, grid, SOLVER_DICT[solver](torch.float64))
    wrapped = SubSteps(SOLVER_DICT[solver](torch.float64), steps)
    _, ours = odeint(_field, x0, torch.tensor([0.2, 1.4], dtype=torch.float64), wrapped)
    assert ours.shape[0] == 2  # only the endpoints are kept
    assert (ours[-1] - reference[-1]).abs().max() <= 1e-12


def test_substeps_rejects_adaptive_solvers_and_bad_counts():
    with pytest.raises(ValueError, match="fixed-step solver"):
        SubSteps(SOLVER_DICT["dopri5"](torch.float32), 2)
    with pytest.raises(ValueError, match="n=0 is invalid"):
        SubSteps(SOLVER_DICT["euler"](torch.float32), 0)


def _saved_bytes_and_grads(sensitivity, steps):
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(solver="rk4", steps=steps, sensitivity=sensitivity)).double()
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(ids).last_hidden_state
    projection_loss(out).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return sum(saved), grads, model.solver_stats()


def test_fixed_step_adjoint_memory_is_flat_in_the_steps_and_its_gradients_match_autograd():
    bytes_1, _, _ = _saved_bytes_and_grads("adjoint", 1)
    bytes_16, adjoint_grads, stats = _saved_bytes_and_grads("adjoint", 16)
    autograd_bytes, autograd_grads, _ = _saved_bytes_and_grads("autograd", 16)
    assert bytes_16 == bytes_1 and bytes_16 < autograd_bytes / 20, (bytes_1, bytes_16, autograd_bytes)
    # The backward solve still takes 16 rk4 steps per site (4 sites): 16 * 4 evaluations,
    # plus torchdyn's two evaluations of the field for dL/dt at the interval's ends.
    assert stats["nfe_backward"] == 4 * (16 * 4 + 2)
    relative = ((adjoint_grads - autograd_grads).norm() / autograd_grads.norm()).item()
    assert relative <= 1e-6, relative


class HostToDeviceCopies(TorchDispatchMode):
    """Records every copy of a non-empty host tensor onto another device: on CUDA a
    blocking copy from ordinary host memory waits for the GPU."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if source.device.type == "cpu" and source.numel() > 0 and out.device.type != "cpu":
                self.copies += 1
        return out


@pytest.mark.parametrize("sensitivity,loop", [("autograd", "direct"), ("autograd", "neural_ode"), ("adjoint", "direct")])
@pytest.mark.parametrize("vector_field", ["residual", "add_norm", "time_residual"])
def test_a_fixed_step_training_step_never_reads_a_device_value(sensitivity, loop, vector_field):
    config = tiny_ode_config(solver="rk4", steps=3, sensitivity=sensitivity, vector_field=vector_field,
                             fixed_step_loop=loop)
    model = bertode.BertODEForMaskedLM(config).to("meta")
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    model(ids, labels=ids).loss.backward()  # builds the solvers (their tableaux move once)
    with HostToDeviceCopies() as forward_copies:
        loss = model(ids, labels=ids).loss
    with HostToDeviceCopies() as backward_copies:
        loss.backward()
    stats = model.solver_stats()
    assert stats["nfe_forward"] == 4 * 3 * 4
    assert forward_copies.copies == 0
    if sensitivity == "autograd":
        assert stats["nfe_backward"] == 0 and backward_copies.copies == 0
    else:
        # torchdyn 1.0.6's adjoint backward builds tensors on the host and copies them over
        # (dL/dt buffers; a zero dL/dt where the field ignores t): outside bertode's reach.
        assert stats["nfe_backward"] == 4 * (3 * 4 + 2)
        assert backward_copies.copies >= 4


def test_the_meta_check_does_catch_a_host_read():
    """The oracle of the test above fails where a solve does read the device: an adaptive solver."""
    model = bertode.BertODEForMaskedLM(tiny_ode_config(solver="dopri5")).to("meta")
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        model(ids, labels=ids)


def _output_and_grads(loop, batch, **overrides):
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(fixed_step_loop=loop, **overrides)).double()
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    out = model(**batch).last_hidden_state
    projection_loss(out).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, model.solver_stats()


@pytest.mark.parametrize("overrides", [
    dict(solver="euler", steps=1),
    dict(solver="midpoint", steps=3),
    dict(solver="rk4", steps=2, vector_field="time_residual"),
    dict(solver="euler", steps=1, block="rk2_gated"),
])
def test_direct_loop_equals_torchdyns_neural_ode(batch, overrides):
    out_direct, grads_direct, stats_direct = _output_and_grads("direct", batch, **overrides)
    out_node, grads_node, stats_node = _output_and_grads("neural_ode", batch, **overrides)
    assert (out_direct - out_node).abs().max() <= 1e-12
    assert set(grads_direct) == set(grads_node)
    for name in grads_node:
        assert (grads_direct[name] - grads_node[name]).abs().max() <= 1e-12, name
    assert stats_direct == stats_node


def test_fixed_step_loop_is_validated():
    with pytest.raises(ValueError, match=r"fixed_step_loop='torchdyn' is invalid; allowed: 'direct', 'neural_ode'"):
        tiny_ode_config(fixed_step_loop="torchdyn")


def test_direct_loop_under_bf16_autocast_keeps_an_fp32_state_like_neural_ode(batch):
    outputs = {}
    for loop in ("direct", "neural_ode"):
        torch.manual_seed(0)
        model = bertode.BertODEModel(tiny_ode_config(solver="rk4", steps=2, fixed_step_loop=loop))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[loop] = model(**batch, output_hidden_states=True).hidden_states[-1]
    assert outputs["direct"].dtype == torch.float32
    assert torch.equal(outputs["direct"], outputs["neural_ode"])
