"""A user's ODE regulariser, through the public API only: a penalty on speeds above a
limit, registered with one decorator, chosen on the command line (``regularizer=``),
integrated along every solve while training, logged, and trained for a few steps."""

import torch

import bertode


@bertode.register_regularizer("speed_limit")
class SpeedLimit(bertode.Regularizer):
    """∫ max(0, ‖f‖²/hidden − 1) dt: only speeds above 1 cost anything."""

    names = ("speeding",)

    def integrands(self, dz, noise_jacobian):
        return [(dz.pow(2).mean(-1) - 1.0).clamp_min(0.0)]


def test_a_user_regulariser_is_a_cli_choice_and_trains(tmp_path):
    from bertode.train import compose, train

    assert "speed_limit" in bertode.available()["regularizer"]
    cfg = compose([f"data.cache_dir={tmp_path / 'cache'}", "regularizer=speed_limit", "regularizer.weight=0.5",
                   "solver=rk4", "trainer.max_steps=4", "trainer.batch_size=4", "data.seq_len=16",
                   "data.vocab_size=300", "data.max_eval_sequences=4", "model.hidden_size=32",
                   "model.intermediate_size=64", "model.num_attention_heads=2", "trainer.log_every=1",
                   "model.hidden_dropout_prob=0.0"])
    result = train(cfg, tmp_path / "run")
    assert result["step"] == 4
    model = bertode.BertODEForMaskedLM.from_pretrained(tmp_path / "run" / "final")
    assert model.config.regularizer == "speed_limit" and model.config.regularizer_weight == 0.5
    with torch.no_grad():  # make it speed: the penalty is positive and logged
        for p in model.bert.encoder.parameters():
            p.mul_(20)
    out = model.train()(input_ids=torch.randint(5, 300, (2, 16)))
    assert out.solver_stats["speeding"] > 0 and model.bert.encoder.ode_penalty.requires_grad
