"""A choice that does not apply to the model's mode is refused, never silently dropped:
on the command line (exit 2, one line naming both fields, nothing written) and in
`BertODEConfig` (ValueError)."""

import sys

import pytest

import bertode

# (command-line overrides, BertODEConfig fields, the two fields the message must name)
PAIRINGS = [
    (["sensitivity=phantom"], dict(sensitivity="phantom"), ("sensitivity='phantom'", "mode='ode'")),
    (["model=deq", "sensitivity=adjoint"], dict(mode="deq", sensitivity="adjoint"), ("sensitivity='adjoint'", "mode='deq'")),
    (["model=bert", "solver=dopri5", "sensitivity=adjoint"], dict(mode="discrete", solver="dopri5", sensitivity="adjoint"),
     ("solver='dopri5'", "mode='discrete'")),
    (["model=bert", "solver=dopri5"], dict(mode="discrete", solver="dopri5"), ("solver='dopri5'", "mode='discrete'")),
    (["model=bert", "sensitivity=adjoint"], dict(mode="discrete", sensitivity="adjoint"),
     ("sensitivity='adjoint'", "mode='discrete'")),
    (["model=deq", "vector_field=add_norm"], dict(mode="deq", vector_field="add_norm"),
     ("vector_field='add_norm'", "mode='deq'")),
    (["deq.solver=broyden"], dict(deq_solver="broyden"), ("solver='broyden'", "mode='ode'")),
    (["model=deq", "block=rk2"], dict(mode="deq", block="rk2"), ("block='rk2'", "mode='deq'")),
    (["sensitivity=adjoint", "block=rk4"], dict(sensitivity="adjoint", block="rk4"), ("sensitivity='adjoint'", "block='rk4'")),
    (["sensitivity=interpolated_adjoint", "solver.ode_backend=torchdiffeq"],
     dict(sensitivity="interpolated_adjoint", ode_backend="torchdiffeq"),
     ("sensitivity='interpolated_adjoint'", "ode_backend='torchdiffeq'")),
]
CLI_ONLY = [  # options of a group the mode does not use, changed from their defaults
    (["model=bert", "solver.steps=4"], ("solver.steps=4", "model.mode='discrete'")),
    (["model=deq", "solver.atol=1e-5"], ("solver.atol=1e-05", "model.mode='deq'")),
    (["deq.max_iter=5"], ("deq.max_iter=5", "model.mode='ode'")),
    # options a choice does not have, and constructor arguments its constructor refuses
    (["sensitivity=interpolated_adjoint", "sensitivity.adjoint_solver=rk4"],
     ("sensitivity.adjoint_solver=rk4", "allowed: sensitivity.name, sensitivity.kwargs")),
    (["vector_field=time_residual", "vector_field.kwargs.width=3"],
     ("vector_field.kwargs.width=3", "vector_field.kwargs.time_features")),
    (["vector_field=time_residual", "vector_field.kwargs.time_features=3"], ("time_features']=3", "an even integer")),
]


@pytest.mark.parametrize("overrides, fields, named", PAIRINGS, ids=lambda v: ",".join(v) if isinstance(v, list) else None)
def test_config_refuses_the_pairing(overrides, fields, named):
    with pytest.raises(ValueError) as error:
        bertode.BertODEConfig(**fields).validate_ode()  # (each field alone is valid: construction passes)
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in named), message


def test_the_cli_exits_2_with_one_line_naming_both_fields(tmp_path, monkeypatch, capsys):
    from bertode.train import main

    cases = [(overrides, named) for overrides, _, named in PAIRINGS] + CLI_ONLY
    for index, (overrides, named) in enumerate(cases):
        run_dir = tmp_path / f"run{index}"
        monkeypatch.setattr(sys, "argv", ["bertode.train", f"hydra.run.dir={run_dir}",
                                          f"data.cache_dir={tmp_path / 'cache'}", *overrides])
        with pytest.raises(SystemExit) as exit_info:
            main()
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2, (overrides, error)
        assert error.count("\n") == 0 and error.startswith("error: "), (overrides, error)
        assert all(name in error for name in named), (overrides, error)
        assert not (tmp_path / "cache").exists() and not run_dir.exists()  # not even Hydra's .hydra/


def test_the_defaults_of_each_mode_are_filled_from_the_registries():
    ode, deq, bert = (bertode.BertODEConfig(mode=m) for m in ("ode", "deq", "discrete"))
    assert (ode.solver, ode.sensitivity, ode.vector_field, ode.block, ode.deq_solver) == (
        "euler", "autograd", "residual", "none", None)
    assert (deq.solver, deq.sensitivity, deq.vector_field, deq.deq_solver, deq.deq_backward_solver) == (
        None, "ift", None, "anderson", "anderson")
    assert (bert.solver, bert.sensitivity, bert.vector_field, bert.deq_solver) == (None, None, None, None)


def test_a_saved_config_is_read_leniently_and_a_constructed_one_strictly():
    """Saved configs (they carry transformers_version; bertode 0.1 wrote every mode's
    defaults and deq_grad) load as the model they were; the same fields typed by a user
    are refused (tests/test_legacy.py loads real 0.1 directories)."""
    old = dict(mode="deq", deq_grad="phantom", solver="euler", sensitivity="autograd", vector_field="residual",
               block="none", deq_solver="broyden")
    config = bertode.BertODEConfig(**old, transformers_version="5.23.0")
    assert (config.sensitivity, config.solver, config.deq_solver) == ("phantom", None, "broyden")
    with pytest.raises(ValueError, match="='residual' is invalid with BertODEConfig.mode='deq'"):
        bertode.BertODEConfig(**old).validate_ode()


def test_options_of_another_mode_are_refused_and_kwargs_are_checked():
    for fields, named in [(dict(mode="discrete", steps=4), ("steps=4", "mode='discrete'")),
                          (dict(mode="deq", ode_backend="torchdiffeq"), ("ode_backend='torchdiffeq'", "mode='deq'")),
                          (dict(deq_max_iter=5), ("deq_max_iter=5", "mode='ode'")),
                          (dict(sensitivity="adjoint", sensitivity_kwargs={"k": 1}), ("sensitivity_kwargs", "'adjoint'")),
                          (dict(vector_field="time_residual", vector_field_kwargs={"width": 3}),
                           ("vector_field_kwargs", "time_features, max_frequency"))]:
        with pytest.raises(ValueError) as error:
            bertode.BertODEConfig(**fields).validate_ode()
        assert all(name in str(error.value) for name in named), str(error.value)


def test_a_config_whose_mode_changes_fills_the_new_modes_defaults(tmp_path):
    config = bertode.BertODEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64)
    bertode.BertODEModel(config).save_pretrained(tmp_path)
    assert json_field(tmp_path, "solver") is None  # a filled-in default is saved as "the mode's default"
    deq = bertode.BertODEModel.from_pretrained(tmp_path, mode="deq")
    assert (deq.config.solver, deq.config.sensitivity, deq.config.deq_solver) == (None, "ift", "anderson")
    config.mode = "discrete"
    assert bertode.BertODEModel(config).config.sensitivity is None


def json_field(folder, key):
    import json

    return json.loads((folder / "config.json").read_text()).get(key)


def test_a_config_is_edited_field_by_field_and_its_pairings_checked_when_a_model_is_built():
    """As transformers' configs (its ConfigTester builds BertConfig(hidden_size=37) with 12 heads): construction
    checks each field alone; the pairings (validate_ode) run when a model is built, in one line."""
    sizes = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    config = bertode.BertODEConfig(hidden_size=37)
    assert bertode.BertODEConfig.from_dict(config.to_dict()).hidden_size == 37
    for order in (("mode", "deq_tol"), ("deq_tol", "mode")):  # either order: no state in between is checked
        config = bertode.BertODEConfig(**sizes)
        for field in order:
            setattr(config, field, {"mode": "deq", "deq_tol": 1e-4}[field])
        model = bertode.BertODEModel(config)
        assert (model.config.solver, model.config.deq_solver, model.config.deq_tol) == (None, "anderson", 1e-4)
    config = bertode.BertODEConfig(**sizes, mode="discrete", solver="rk4")  # each field alone is valid
    with pytest.raises(ValueError, match=r"^BertODEConfig.solver='rk4' is invalid with BertODEConfig.mode='discrete'; "
                                         r"allowed: None \(it applies to mode='ode'\)$"):
        bertode.BertODEForMaskedLM(config)
    config.solver = None
    assert bertode.BertODEForMaskedLM(config).config.sensitivity is None
    with pytest.raises(ValueError, match=r"^BertODEConfig.deq_tol=-1.0 is invalid; allowed: a finite number > 0$"):
        bertode.BertODEConfig(deq_tol=-1.0)  # a bad value on its own: still refused on construction
