"""A researcher's own fixed-point solver, in one file, through the public API only:
Picard iteration with a fixed damping of 1/2. Its z* satisfies the fixed-point equation
to the tolerance, agrees with Anderson's, serves as the IFT's backward solver, and
trains a DEQ for a few steps from Python."""

import json

import torch

import bertode

DAMPING = 0.5


@bertode.register_fixed_point_solver("picard_half")
def picard_half(f, z0, max_iter, tol, stop_mode="rel", damping=1.0, memory=None, name="deq"):
    """z <- z / 2 + f(z) / 2, whatever the configured damping."""
    track = bertode.FixedPointTracker(z0, tol, stop_mode, name)
    z = z0
    for _ in range(max_iter):
        fz = f(z)
        if track.observe(z, fz):
            break
        z = (1 - DAMPING) * z + DAMPING * fz
    return track.best, track.info()


TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _deq(**options):
    config = bertode.BertODEConfig(**TINY, mode="deq", deq_tol=1e-6, deq_max_iter=200, **options)
    return bertode.BertODEModel(config).double().eval()


def test_its_fixed_point_satisfies_the_equation_and_agrees_with_anderson():
    torch.manual_seed(0)
    model = _deq(deq_solver="picard_half")
    reference = _deq(deq_solver="anderson")
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids)
        z_star = out.last_hidden_state
        embeddings = model.embeddings(input_ids=ids)
        f = model.encoder.layer_map(embeddings, None, torch.float64)
        flat = z_star.reshape(2, -1)
        fz = f(flat)
        residual = ((fz - flat).norm(dim=1) / fz.norm(dim=1)).max().item()
        anderson = reference(ids).last_hidden_state
    assert residual <= 1e-6, residual
    assert (z_star - anderson).abs().max() <= 1e-4
    stats = out.solver_stats
    assert stats["converged_fraction"] == 1.0 and stats["forward_iterations"] > reference.solver_stats()["forward_iterations"]


def test_it_solves_the_implicit_backward_like_anderson():
    torch.manual_seed(0)
    grads = {}
    for solver in ("picard_half", "anderson"):
        torch.manual_seed(0)
        model = _deq(deq_backward_solver=solver, deq_backward_tol=1e-10, deq_backward_max_iter=300).train()
        ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(4))
        out = model(ids).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[solver] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    relative = ((grads["picard_half"] - grads["anderson"]).norm() / grads["anderson"].norm()).item()
    assert relative <= 1e-6, relative


def test_trained_for_a_few_steps_from_python(tmp_path):
    from bertode.train import compose, train

    cfg = compose(["model=deq", "deq.solver=picard_half", "deq.backward_solver=picard_half", "deq.max_iter=40",
                   f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16", "data.vocab_size=300",
                   "data.max_eval_sequences=4", "trainer.batch_size=4", "trainer.max_steps=3", "trainer.warmup_steps=1",
                   "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
                   "model.num_hidden_layers=1"])
    train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert len(train_records) == 3 and all(1 <= r["forward_iterations"] <= 40 for r in train_records)
    assert all(r["backward_iterations"] >= 1 for r in train_records)
    assert json.loads((tmp_path / "final" / "config.json").read_text())["deq_solver"] == "picard_half"
