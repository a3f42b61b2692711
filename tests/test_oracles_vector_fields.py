"""The vector fields against their equations, written out here (issue 29: they kill
`bertode/layers/vector_fields.py`'s mutants; docs/testing.md, "Mutation testing").

* ``time_weights``: every Linear W of the branch becomes W(t) = W + U_i diag(g_i) D_i with
  gates g = A phi(t), phi(t) = [sin(w_k t), cos(w_k t)], w_k geometric from 1 to
  max_frequency; checked in float64 (within 1e-6: phi is computed in float32) at scalar and
  per-sequence t, with U, D drawn at scales 1/sqrt(rank) and 1/sqrt(in_features), and the
  branch left plain outside the field.
* ``time_residual``: its documented defaults, dtypes and refusals (its Fourier closed form
  is in tests/test_mutation_kills.py).
* the registry: ``register_vector_field``, ``build_vector_field``'s kwargs and the base
  class's one-line refusal.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig

from bertode.layers.vector_fields import (VECTOR_FIELDS, ResidualField, TimeResidualField, TimeWeightsField,
                                          VectorField, build_vector_field, register_vector_field)

CONFIG = BertConfig(hidden_size=8, num_attention_heads=2)


def _fourier(t: float, max_frequency: float, half: int) -> torch.Tensor:
    w = torch.tensor([max_frequency ** (k / (half - 1)) if half > 1 else 1.0 for k in range(half)], dtype=torch.float64)
    return torch.cat([torch.sin(w * t), torch.cos(w * t)])


def _branch() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6))


def _reference(field: TimeWeightsField, branch: nn.Sequential, t: float, z: torch.Tensor) -> torch.Tensor:
    """The branch with W(t) = W + U diag(A phi(t)) D in each Linear, in float64."""
    gates = (field.generator.weight.double() @ _fourier(t, field.max_frequency, field.time_features // 2)).view(2, -1)
    x = z.double()
    for index, linear in enumerate((branch[0], branch[2])):
        change = field.up[index].double() @ torch.diag(gates[index]) @ field.down[index].double()
        weight = linear.weight.double() + change
        x = x @ weight.T + linear.bias.double()
        if index == 0:
            x = torch.tanh(x)
    return x


def _bound(rank=3, time_features=6, max_frequency=9.0, dtype=torch.float64):
    torch.manual_seed(0)
    branch = _branch()
    field = TimeWeightsField(CONFIG, rank=rank, time_features=time_features, max_frequency=max_frequency)
    field.bind(branch)
    with torch.no_grad():
        field.generator.weight.normal_()
    return field.to(dtype), branch.to(dtype)


def test_time_weights_field_is_the_low_rank_closed_form_at_scalar_and_per_sequence_times():
    field, branch = _bound()
    z = torch.randn(2, 4, 6, dtype=torch.float64)
    assert torch.equal(branch(z), _branch_plain(branch, z))  # before any evaluation the hooks change nothing
    for t in (0.0, 0.3, 0.85):
        torch.testing.assert_close(field(torch.tensor(t, dtype=torch.float64), z, branch, None),
                                   _reference(field, branch, t, z), rtol=1e-6, atol=1e-6)
    out = field(torch.tensor([0.3, 0.85], dtype=torch.float64).view(2, 1, 1), z, branch, None)
    for row, t in enumerate((0.3, 0.85)):  # each sequence at its own time
        torch.testing.assert_close(out[row], _reference(field, branch, t, z[row]), rtol=1e-6, atol=1e-6)
    assert torch.equal(branch(z), _branch_plain(branch, z))  # and after one: the gates are cleared


def _branch_plain(branch: nn.Sequential, z: torch.Tensor) -> torch.Tensor:
    first, second = branch[0], branch[2]
    return torch.tanh(z @ first.weight.T + first.bias) @ second.weight.T + second.bias


def test_time_weights_defaults_parameters_and_initial_scales():
    field = TimeWeightsField(CONFIG)
    assert (field.rank, field.time_features, field.max_frequency) == (4, 16, 4.0)
    torch.manual_seed(0)
    branch = nn.Sequential(*(nn.Linear(64, 32) for _ in range(4)))
    field.bind(branch)
    names = {name for name, _ in field.named_parameters()}
    assert names == {"generator.weight"} | {f"{side}.{i}" for side in ("down", "up") for i in range(4)}  # g = A phi(t)
    assert field.generator.weight.shape == (4 * 4, 16) and torch.count_nonzero(field.generator.weight) == 0
    down = torch.cat([d.detach().flatten() for d in field.down])  # 4 x 4 x 64 draws of N(0, 1/64)
    up = torch.cat([u.detach().flatten() for u in field.up])  # 4 x 32 x 4 draws of N(0, 1/4)
    assert abs(down.std().item() * math.sqrt(64) - 1) < 0.1 and abs(up.std().item() * math.sqrt(4) - 1) < 0.1


def test_time_weights_gates_follow_the_fields_dtype_and_not_the_times():
    """A float64 field takes float32 Fourier features to its dtype; a time given in float64
    gives the bits of the same time in float32 (the features are computed in float32)."""
    field, branch = _bound()
    z = torch.randn(1, 3, 6, dtype=torch.float64)
    assert field(torch.tensor(0.5), z, branch, None).dtype == torch.float64
    field, branch = _bound(dtype=torch.float32)
    z = z.float()
    for t in (0.375, 0.8125, 1.0):
        assert torch.equal(field(torch.tensor(t, dtype=torch.float64), z, branch, None),
                           field(torch.tensor(t, dtype=torch.float32), z, branch, None))


def test_time_weights_change_is_made_in_the_branch_inputs_dtype():
    """A bfloat16 branch under a float32 field: U, D and the gates are cast to the input's dtype."""
    field, branch = _bound(dtype=torch.float32)
    branch.to(torch.bfloat16)
    z = torch.randn(2, 3, 6).to(torch.bfloat16)
    out = field(torch.tensor(0.3), z, branch, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(field, branch, 0.3, z), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("rank, time_features", [(0, 16), (2.0, 16), (-1, 16), (4, 3), (4, 1), (4, 0)])
def test_time_weights_refusal_is_the_one_line_error(rank, time_features):
    with pytest.raises(ValueError) as error:
        TimeWeightsField(CONFIG, rank=rank, time_features=time_features)
    assert str(error.value) == (f"BertODEConfig.vector_field_kwargs={{'rank': {rank!r}, 'time_features': "
                                f"{time_features!r}}} is invalid; allowed: rank >= 1, time_features even >= 2")


def test_time_weights_smallest_rank_and_features_are_the_closed_form():
    field, branch = _bound(rank=1, time_features=2)  # one gate per Linear, phi(t) = [sin t, cos t]
    z = torch.randn(1, 2, 6, dtype=torch.float64)
    torch.testing.assert_close(field(torch.tensor(0.6, dtype=torch.float64), z, branch, None),
                               _reference(field, branch, 0.6, z), rtol=1e-6, atol=1e-6)


def test_time_residual_defaults_bias_dtypes_and_smallest_features():
    field = TimeResidualField(CONFIG)
    assert (field.time_features, field.max_frequency) == (16, 100.0)
    assert field.time_proj.bias is None and [name for name, _ in field.named_parameters()] == ["time_proj.weight"]
    small = TimeResidualField(CONFIG, time_features=2, max_frequency=7.0)  # phi(t) = [sin t, cos t]
    with torch.no_grad():
        small.time_proj.weight.copy_(torch.arange(16.0).view(8, 2))
    torch.testing.assert_close(small.time_embedding(torch.tensor(0.4)).double(),
                               torch.arange(16.0, dtype=torch.float64).view(8, 2) @ _fourier(0.4, 7.0, 1),
                               rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        field.time_proj.weight.normal_()
    double = TimeResidualField(CONFIG).double()  # a float64 field takes the float32 features to float64
    with torch.no_grad():
        double.time_proj.weight.copy_(field.time_proj.weight)
    assert double.time_embedding(torch.tensor(0.3)).dtype == torch.float64
    for t in (0.375, 0.8125):  # a float64 time gives the bits of the same float32 time
        assert torch.equal(field.time_embedding(torch.tensor(t, dtype=torch.float64)),
                           field.time_embedding(torch.tensor(t)))
    z = torch.randn(2, 3, 8).to(torch.bfloat16)  # the state keeps its dtype through the field
    out = field(torch.tensor(0.3), z, lambda x: 2 * x, None)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, 2 * (z + field.time_embedding(torch.tensor(0.3)).to(torch.bfloat16)))


def test_build_vector_field_passes_its_kwargs_and_the_base_refuses_extra_ones():
    import bertode
    config = bertode.BertODEConfig(hidden_size=8, num_attention_heads=2, vector_field="time_residual",
                                   vector_field_kwargs={"time_features": 4, "max_frequency": 3.0})
    field = build_vector_field(config)
    assert type(field) is TimeResidualField and (field.time_features, field.max_frequency) == (4, 3.0)
    with pytest.raises(ValueError) as error:
        ResidualField(CONFIG, width=3)
    assert str(error.value) == ("BertODEConfig.vector_field_kwargs={'width': 3} is invalid for vector_field="
                                "'residual'; allowed: no extra arguments")


def test_register_vector_field_by_name_with_and_without_default(monkeypatch):
    monkeypatch.setattr(VECTOR_FIELDS, "_entries", dict(VECTOR_FIELDS._entries))
    monkeypatch.setattr(VECTOR_FIELDS, "default", VECTOR_FIELDS.default)

    class Decay(VectorField):
        def forward(self, t, z, branch, norm):
            return -z

    class Grow(Decay):
        pass

    assert register_vector_field("decay_for_test")(Decay) is Decay
    assert VECTOR_FIELDS["decay_for_test"] is Decay and Decay.registry_name == "decay_for_test"
    assert VECTOR_FIELDS.default == "residual"
    register_vector_field("grow_for_test", default=True)(Grow)
    assert VECTOR_FIELDS["grow_for_test"] is Grow and VECTOR_FIELDS.default == "grow_for_test"
