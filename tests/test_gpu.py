"""CUDA checks: the Euler-1 identity on the GPU, no host synchronisation inside fixed-step
solves (CUDA's own sync detector), bf16 training steps, and Inductor-compiled models.

Skipped where no CUDA device is present (CI and the CPU development machine); on CPU the
no-synchronisation property is checked on the meta device (`tests/test_substeps.py`).
"""

import copy

import pytest
import torch
from transformers import BertForMaskedLM

import bertode
from conftest import tiny_bert_config, tiny_ode_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 would make fp32 comparisons with HF differ by ~1e-3; compare true fp32."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _inputs(batch=2, seq=12, padded=True):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[1, seq - 3:] = 0
    return {k: v.to(CUDA) for k, v in dict(input_ids=ids, attention_mask=mask, labels=ids).items()}


def test_euler_1_equals_hf_bert_on_cuda():
    torch.manual_seed(0)
    hf = BertForMaskedLM(tiny_bert_config(attn_implementation="sdpa")).to(CUDA)
    ode = bertode.from_bert(hf, solver="euler", steps=1).to(CUDA)
    inputs = _inputs()
    hf_out, ode_out = hf(**inputs), ode(**inputs)
    assert (hf_out.logits - ode_out.logits).abs().max() <= 1e-5
    hf_out.loss.backward()
    ode_out.loss.backward()
    hf_grads = dict(hf.named_parameters())
    for name, parameter in ode.named_parameters():
        if parameter.grad is not None and name in hf_grads:
            assert (parameter.grad - hf_grads[name].grad).abs().max() <= 1e-5, name


@pytest.mark.parametrize("overrides", [dict(solver="euler", steps=4), dict(solver="rk4", steps=2),
                                       dict(solver="rk4", steps=2, sensitivity="adjoint",
                                            attention_probs_dropout_prob=0.0),
                                       dict(solver="midpoint", steps=2, vector_field="time_residual")])
def test_fixed_step_solves_never_synchronise(overrides):
    model = bertode.BertODEForMaskedLM(tiny_ode_config(**overrides)).to(CUDA)
    inputs = _inputs(padded=False)
    inputs.pop("attention_mask")  # the all-ones mask test (outside the solves) reads the mask on the host
    model(**inputs).loss.backward()  # builds and caches the solvers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(**inputs).loss
        if overrides.get("sensitivity") != "adjoint":  # torchdyn's adjoint backward copies host tensors
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model.solver_stats()["nfe_forward"] > 0


def test_bf16_autocast_training_steps_keep_fp32_states_and_learn():
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(tiny_ode_config(solver="rk4", steps=2)).to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    inputs = _inputs()
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**inputs, output_hidden_states=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert out.hidden_states[-1].dtype == torch.float32  # the ODE state is integrated in fp32
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("overrides", [dict(solver="euler", steps=1), dict(solver="dopri5")])
def test_inductor_compiled_model_matches_eager_on_cuda(overrides):
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(tiny_ode_config(**overrides)).to(CUDA)
    eager = copy.deepcopy(model)
    compiled = bertode.compile_model(model)
    inputs = _inputs()
    compiled_loss, eager_loss = compiled(**inputs).loss, eager(**inputs).loss
    assert abs(compiled_loss.item() - eager_loss.item()) <= 1e-4
    compiled_loss.backward()
    eager_loss.backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max() <= 1e-3 * (1 + q.grad.abs().max()), name
