"""User-registered vector fields, and the torchdyn import error."""

import subprocess
import sys

import torch
from torch import nn

import bertode
from conftest import projection_loss, tiny_ode_config


@bertode.register_vector_field("scaled_residual")
class ScaledResidual(bertode.VectorField):
    """dz/dt = s * G(z) with a learned scalar s (the README's example)."""

    def __init__(self, config, scale: float = 1.0):
        super().__init__(config)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, t, z, branch, norm):
        return self.scale * branch(z)

    def finish(self, z, norm):
        return norm(z)


def test_a_registered_field_is_selected_by_name_and_trained_by_the_adjoint():
    assert "scaled_residual" in bertode.available_vector_fields()
    config = tiny_ode_config(vector_field="scaled_residual", vector_field_kwargs={"scale": 0.0},
                             solver="dopri5", sensitivity="adjoint")
    model = bertode.BertODEModel(config)
    ids = torch.randint(0, 64, (2, 6))
    out = model(ids).last_hidden_state
    # scale 0: the field is zero, so each site is just its LayerNorm
    with torch.no_grad():
        hidden = model.embeddings(ids)
        for layer in model.encoder.layer:
            hidden = layer.feed_forward.norm(layer.attention.norm(hidden))
    assert (out - hidden).abs().max() <= 1e-5
    projection_loss(out).backward()
    assert model.encoder.layer[0].attention.field.scale.grad.abs() > 0
    assert model.solver_stats()["nfe_backward"] > 0


def test_registering_a_non_field_or_a_taken_name_fails():
    import pytest

    with pytest.raises(TypeError):
        bertode.register_vector_field("bad")(object)
    with pytest.raises(ValueError, match="already registered"):
        @bertode.register_vector_field("residual")
        class Another(bertode.VectorField):
            def forward(self, t, z, branch, norm):
                return branch(z)


def test_missing_torchdyn_names_the_install_command():
    code = "import sys; sys.modules['torchdyn'] = None; import bertode"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "pip install --no-deps torchdyn==1.0.6" in result.stderr
