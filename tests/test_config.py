"""Every bad ODE config value raises a one-line ValueError naming field, value and what is allowed."""

import json

import pytest

import bertode
from conftest import tiny_ode_config

BAD_VALUES = [
    ("mode", "deeq", "'ode', 'discrete'"),
    ("vector_field", "nope", "'add_norm'"),
    ("vector_field_kwargs", [1], "a dict or None"),
    ("solver", "heun3", "'dopri5'"),
    ("steps", 0, "integer >= 1"),
    ("steps", 2.5, "integer >= 1"),
    ("t_end", -1.0, "> 0"),
    ("atol", -1e-3, "> 0"),
    ("rtol", 0.0, "> 0"),
    ("atol", float("nan"), "> 0"),
    ("adjoint_atol", -1.0, "> 0"),
    ("adjoint_rtol", "small", "> 0"),
    ("sensitivity", "backprop", "'interpolated_adjoint'"),
    ("adjoint_solver", "rk45", "'dopri5'"),
    ("ode_backend", "scipy", "'torchdiffeq'"),
    ("weight_tying", "yes", "True or False"),
    ("block", "rk3", "'rk2_gated'"),
    ("num_hidden_layers", 0, "integer >= 1"),
    ("deq_solver", "newton", "'broyden'"),
    ("deq_backward_solver", "lu", "'fixed_point'"),
    ("sensitivity", "jfb", "'phantom'"),
    ("deq_stop_mode", "max", "'rel', 'abs'"),
    ("deq_injection", "concat", "'qkv'"),
    ("deq_on_nonfinite", "ignore", "'skip'"),
    ("deq_max_iter", 0, "integer >= 1"),
    ("deq_memory", 2.0, "integer >= 1"),
    ("deq_pretrain_steps", -1, "integer >= 0"),
    ("deq_tol", -1e-3, "> 0"),
    ("deq_backward_tol", 0, "> 0"),
    ("deq_damping", 1.5, "(0, 1]"),
    ("jac_reg_weight", -0.1, ">= 0"),
    ("jac_reg_freq", 2, "[0, 1]"),
    ("deq_weight_norm", 1, "True or False"),
]


@pytest.mark.parametrize("field, value, allowed", BAD_VALUES)
def test_bad_value_is_named(field, value, allowed):
    with pytest.raises(ValueError) as error:
        tiny_ode_config(**{field: value})
    message = str(error.value)
    assert "\n" not in message
    assert f"{field}={value!r}" in message and allowed in message


@pytest.mark.parametrize("combination, field", [
    (dict(mode="deq", block="rk2"), "block"),
    (dict(ode_backend="torchdiffeq", solver="tsit5"), "solver"),
    (dict(ode_backend="torchdiffeq", sensitivity="interpolated_adjoint"), "sensitivity"),
    (dict(ode_backend="torchdiffeq", adjoint_solver="tsit5"), "adjoint_solver"),
    (dict(block="rk2", sensitivity="adjoint"), "sensitivity"),
    (dict(sensitivity="adjoint", attention_probs_dropout_prob=0.1), "attention_probs_dropout_prob"),
    (dict(num_attention_heads=5), "num_attention_heads"),
])
def test_impossible_combinations_are_named(combination, field):
    config = tiny_ode_config(**combination)  # a pairing: refused when a model is built, as validate_ode()
    with pytest.raises(ValueError, match=f"BertODEConfig.{field}="):
        config.validate_ode()
    with pytest.raises(ValueError, match=f"BertODEConfig.{field}="):
        bertode.BertODEModel(config)


def test_time_field_kwargs_are_checked():
    with pytest.raises(ValueError, match="time_features"):
        bertode.BertODEModel(tiny_ode_config(vector_field="time_residual", vector_field_kwargs={"time_features": 3}))
    with pytest.raises(ValueError, match="vector_field_kwargs"):
        bertode.BertODEModel(tiny_ode_config(vector_field="residual", vector_field_kwargs={"unknown": 1}))


def test_config_json_round_trip(tmp_path):
    config = tiny_ode_config(solver="dopri5", atol=1e-5, sensitivity="adjoint", vector_field="add_norm", block="none")
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["model_type"] == "bertode" and stored["solver"] == "dopri5" and stored["atol"] == 1e-5
    loaded = bertode.BertODEConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
