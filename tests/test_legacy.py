"""Models and checkpoints written before the registries (bertode 0.1) still load as what
they were: the rk2_gated gate's old parameter name, configs carrying ``deq_grad`` and every
mode's defaults, and training checkpoints whose DEQ counters lived in ``state.pt``."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import bertode
from bertode.training import checkpoint

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# What bertode 0.1 wrote into config.json besides BertConfig's fields (its defaults for every mode).
OLD_FIELDS = dict(vector_field="residual", solver="euler", sensitivity="autograd", block="none", deq_solver="anderson",
                  deq_backward_solver="anderson", deq_grad="ift")


def _as_written_by_0_1(folder, mode, block="none"):
    """Rewrite a saved model the way bertode 0.1 laid it out."""
    weights = load_file(folder / "model.safetensors")
    weights = {k.replace(".block.gate.", ".gate."): v for k, v in weights.items()
               if not k.endswith(("training_forwards", "skipped_batches", "nonconverged_solves"))}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    if (folder / "config.json").is_file():  # a model directory (training checkpoints have none)
        config = json.loads((folder / "config.json").read_text())
        config.update(OLD_FIELDS, mode=mode, block=block)
        (folder / "config.json").write_text(json.dumps(config))


def test_a_0_1_rk2_gated_model_loads_its_gate(tmp_path):
    torch.manual_seed(0)
    model = bertode.BertODEModel(bertode.BertODEConfig(**TINY, block="rk2_gated")).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.block.gate.weight.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    _as_written_by_0_1(tmp_path, "ode", block="rk2_gated")
    assert any(".gate." in k and ".block." not in k for k in load_file(tmp_path / "model.safetensors"))
    loaded = bertode.BertODEModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_0_1_configs_load_in_every_mode(tmp_path):
    for mode, expected in [("ode", ("euler", "autograd", None)), ("discrete", (None, None, None)),
                           ("deq", (None, "ift", "anderson"))]:
        folder = tmp_path / mode
        bertode.BertODEModel(bertode.BertODEConfig(**TINY, mode=mode)).save_pretrained(folder)
        _as_written_by_0_1(folder, mode)
        loaded = bertode.BertODEModel.from_pretrained(folder)
        assert (loaded.config.solver, loaded.config.sensitivity, loaded.config.deq_solver) == expected, mode


def test_a_0_1_training_checkpoint_resumes_with_its_counters(tmp_path):
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**TINY, mode="deq", deq_pretrain_steps=5))
    target = checkpoint.save(tmp_path, 3, model, {"step": 3, "encoder_counters": {
        "training_forwards": 3, "nonconverged_solves": 1, "skipped_batches": 0}})
    (target / "config.json").unlink()  # 0.1 wrote neither a config nor a manifest
    (target / "manifest.json").unlink()
    _as_written_by_0_1(target, "deq")
    fresh = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**TINY, mode="deq", deq_pretrain_steps=5))
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json is missing"):  # never trusted silently
        checkpoint.load(target, fresh)
    checkpoint.seal(target)  # its owner vouches for its files
    state = checkpoint.load(target, fresh)
    assert state["step"] == 3
    assert fresh.bert.encoder.counters() == {"training_forwards": 3, "skipped_batches": 0, "nonconverged_solves": 1}
