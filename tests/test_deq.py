"""DEQ mode against its oracles: the fixed-point equation itself, torchdeq's Anderson,
float64 finite differences, the unrolled gradient, saved-tensor bytes of a 12-layer BERT,
and the fp32 solve; plus the failure behaviour the config promises."""

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

import bertode
from bertode import DEQSolveError
from bertode.solve.fixed_point import FIXED_POINT_SOLVERS as SOLVERS

from conftest import TINY, projection_loss

DEQ = dict(TINY, num_hidden_layers=1, mode="deq")


def deq_model(cls=bertode.BertODEModel, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(bertode.BertODEConfig(**{**DEQ, **overrides}))


def map_and_state(model, batch, dtype=torch.float32):
    """The model's layer map f for this batch and a zero initial state."""
    with torch.no_grad():
        embeddings = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        f = model.encoder.layer_map(embeddings, bertode.modeling.sdpa_mask(batch["attention_mask"]), dtype)
    return f, embeddings.new_zeros(embeddings.shape[0], embeddings[0].numel(), dtype=dtype)


def relative_residual(f, z):
    with torch.no_grad():
        fz = f(z)
    return ((fz - z).norm(dim=1) / fz.norm(dim=1)).max().item()


def test_solvers_reach_tolerance_and_agree(batch):
    tol = 1e-4
    model = deq_model().eval()
    f, z0 = map_and_state(model, batch)
    solutions = {}
    for name, solver in SOLVERS.items():
        with torch.no_grad():
            z, info = solver(f, z0, max_iter=200, tol=tol, stop_mode="rel", damping=1.0, memory=5)
        assert bool(info.converged.all()), (name, info.history[-3:])
        assert relative_residual(f, z) <= tol, name
        solutions[name] = z
    reference = solutions["anderson"]
    for name, z in solutions.items():
        assert ((z - reference).norm(dim=1) / reference.norm(dim=1)).max().item() <= 10 * tol, name


def test_qkv_injection_enters_attention_only(batch):
    """With ``qkv`` the residual stream never sees e(x) directly: f(z) equals the layer
    on z with U e(x) added to its Q, K and V projections, computed here by hand."""
    model = deq_model(deq_injection="qkv").eval()
    f, z0 = map_and_state(model, batch)
    layer, injection = model.encoder.layer[0], model.encoder.injection
    with torch.no_grad():
        embeddings = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        z = torch.randn(embeddings.shape)
        attention = layer.attention.branch
        dq, dk, dv = injection(embeddings).chunk(3, dim=-1)
        heads = lambda x: x.view(2, 10, 4, 8).transpose(1, 2)
        scores = heads(attention.query(z) + dq) @ heads(attention.key(z) + dk).transpose(-1, -2) / math.sqrt(8)
        scores = scores.masked_fill(batch["attention_mask"][:, None, None, :] == 0, float("-inf"))
        context = (scores.softmax(-1) @ heads(attention.value(z) + dv)).transpose(1, 2).reshape(2, 10, 32)
        a = layer.attention.norm(z + attention.dense(context))
        expected = layer.feed_forward.norm(a + layer.feed_forward.branch(a))
        assert torch.allclose(f(z.reshape(2, -1)).view(2, 10, 32), expected, atol=1e-5)


def test_anderson_matches_torchdeq(batch):
    torchdeq_solver = pytest.importorskip("torchdeq.solver")
    model = deq_model().eval()
    f, z0 = map_and_state(model, batch)
    with torch.no_grad():
        ours, _ = SOLVERS["anderson"](f, z0, max_iter=100, tol=1e-6, memory=5)
        # torchdeq's keyword for the stopping norm is f_stop_mode (it ignores unknown ones).
        theirs, _, _ = torchdeq_solver.anderson_solver(f, z0, max_iter=100, tol=1e-6, m=5, f_stop_mode="rel")
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4


def test_forward_stats_and_model_residual(batch):
    model = deq_model(deq_tol=1e-4, deq_max_iter=60)
    out = model(**batch)
    stats = model.solver_stats()
    assert stats["converged_fraction"] == 1.0 and stats["forward_rel_residual"] <= 1e-4
    assert 1 < stats["forward_iterations"] <= 60
    assert model.encoder.last_forward_info.history[-1] <= 1e-4
    projection_loss(out.last_hidden_state).backward()
    stats = model.solver_stats()
    assert stats["backward_rel_residual"] <= model.config.deq_backward_tol
    assert stats["nonconverged_solves"] == 0


def _gradient(model, batch):
    model.zero_grad()
    projection_loss(model(**batch).last_hidden_state).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


TIGHT = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, deq_tol=1e-11, deq_max_iter=300,
             deq_backward_tol=1e-11, deq_backward_max_iter=300, deq_memory=8)


def test_ift_gradient_matches_finite_differences_and_unrolled(batch):
    model = deq_model(**TIGHT).double()
    ift = _gradient(model, batch)
    assert model.solver_stats()["forward_rel_residual"] <= 1e-11

    # Central finite differences along a random direction in parameter space, in float64.
    params = [p for p in model.parameters() if p.requires_grad]
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    eps = 1e-5

    def loss_at(sign):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            value = projection_loss(model(**batch).last_hidden_state).item()
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return value

    numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
    analytic = sum((p.grad * d).sum().item() for p, d in zip(params, direction) if p.grad is not None)
    assert abs(analytic - numeric) / abs(numeric) <= 1e-4

    unrolled_model = deq_model(**TIGHT, sensitivity="unrolled").double()
    unrolled = _gradient(unrolled_model, batch)
    assert ((ift - unrolled).norm() / unrolled.norm()).item() <= 1e-4


@pytest.mark.parametrize("steps, damping", [(1, 1.0), (5, 0.8)])
def test_phantom_gradient_is_aligned_with_ift(batch, steps, damping):
    """Measured: cosine 0.982 for one step (Jacobian-free backprop), 0.99985 for 5 steps at tau 0.8."""
    ift = _gradient(deq_model(deq_tol=1e-6, deq_max_iter=100), batch)
    phantom = _gradient(deq_model(deq_tol=1e-6, deq_max_iter=100, sensitivity="phantom",
                                  deq_phantom_steps=steps, deq_damping=damping), batch)
    cosine = torch.nn.functional.cosine_similarity(ift, phantom, dim=0).item()
    assert cosine >= (0.9 if steps == 1 else 0.999), cosine


def _saved_bytes(model, batch):
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = projection_loss(model(**batch).last_hidden_state)
    loss.backward()
    return total


def test_ift_memory_is_independent_of_iterations_and_below_bert(batch):
    width = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4)
    # tol far below reach: every solve runs exactly max_iter iterations.
    saved = {}
    for iterations in (10, 40):
        model = deq_model(**width, deq_tol=1e-30, deq_max_iter=iterations)
        saved[iterations] = _saved_bytes(model, batch)
        assert model.solver_stats()["forward_iterations"] == iterations
    assert saved[10] == saved[40]
    bert = bertode.BertODEModel(bertode.BertODEConfig(**{**TINY, **width, "num_hidden_layers": 12, "mode": "discrete"}))
    assert saved[10] <= _saved_bytes(bert, batch) / 4


def test_bf16_autocast_forward_converges_like_fp32(batch):
    model = deq_model(deq_tol=1e-4, deq_max_iter=60).eval()
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch).last_hidden_state
    stats = model.solver_stats()
    assert stats["converged_fraction"] == 1.0 and stats["forward_rel_residual"] <= 1e-4
    # The solve ran in fp32; only the embeddings/injection saw bf16 rounding.
    assert (out.float() - reference).abs().max().item() < 0.1


def _poison(model):
    with torch.no_grad():
        model.bert.encoder.layer[0].feed_forward.branch.intermediate.bias[0] = float("nan")


def test_nan_in_the_layer_raises_a_named_error(batch):
    model = deq_model(bertode.BertODEForMaskedLM)
    _poison(model)
    with pytest.raises(DEQSolveError, match=r"DEQ forward solve of the map over layers 0-0: non-finite value in f\(z\) at iteration 1"):
        model(**batch, labels=batch["input_ids"])


def test_nan_batch_is_skipped_and_counted_when_configured(batch):
    model = deq_model(bertode.BertODEForMaskedLM, deq_on_nonfinite="skip")
    healthy = {k: v.clone() for k, v in model.state_dict().items()}
    _poison(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    optimizer.step()
    assert out.loss.item() == 0.0 and model.solver_stats()["skipped_batches"] == 1
    state = model.state_dict()
    counters = ("training_forwards", "skipped_batches", "nonconverged_solves")  # buffers that count the batch
    for key, value in healthy.items():
        if "intermediate.bias" not in key and not key.endswith(counters):
            assert torch.equal(state[key], value), key


def test_non_converging_solve_is_counted_and_training_continues(batch):
    model = deq_model(bertode.BertODEForMaskedLM, deq_tol=1e-12, deq_max_iter=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert math.isfinite(loss.item())
    stats = model.solver_stats()
    assert stats["nonconverged_solves"] == 2 and stats["converged_fraction"] == 0.0


def test_hutchinson_penalty_estimates_the_jacobian_frobenius_norm(batch):
    model = deq_model(hidden_size=16, intermediate_size=32, num_attention_heads=2, jac_reg_weight=1.0,
                      deq_tol=1e-6, deq_max_iter=100)
    small = {k: v[:1, :4] for k, v in batch.items()}
    f, _ = map_and_state(model, small)
    with torch.no_grad():
        z_star, _ = SOLVERS["anderson"](f, torch.zeros(1, 4 * 16), max_iter=100, tol=1e-6)
    jacobian = torch.autograd.functional.jacobian(lambda z: f(z), z_star).reshape(64, 64)
    exact = jacobian.pow(2).sum().item() / 64
    torch.manual_seed(0)
    estimates = [model.encoder._jacobian_penalty(f, z_star).item() for _ in range(400)]
    assert abs(sum(estimates) / len(estimates) - exact) / exact <= 0.1


def test_jacobian_penalty_is_added_to_the_loss(batch):
    plain = deq_model(bertode.BertODEForMaskedLM)
    regularised = deq_model(bertode.BertODEForMaskedLM, jac_reg_weight=0.5)
    base = plain(**batch, labels=batch["input_ids"]).loss
    total = regularised(**batch, labels=batch["input_ids"]).loss
    penalty = regularised.solver_stats()["jac_loss"]
    assert penalty > 0 and abs(total.item() - base.item() - 0.5 * penalty) <= 1e-5


def test_jacobian_weight_grows_by_a_tenth_every_increment_period(batch):
    """locuslab/deq's --jac_incremental: weight + 0.1 per period of training forwards, from 0 too."""
    plain = deq_model(bertode.BertODEForMaskedLM)
    model = deq_model(bertode.BertODEForMaskedLM, jac_reg_increment_every=2)
    seen = []
    for _ in range(5):
        base = plain(**batch, labels=batch["input_ids"]).loss
        total = model(**batch, labels=batch["input_ids"]).loss
        penalty = model.solver_stats().get("jac_loss", 0.0)
        seen.append(round(model.base_model.encoder.jac_weight, 6))
        assert abs(total.item() - base.item() - seen[-1] * penalty) <= 1e-5
    assert seen == [0.0, 0.1, 0.1, 0.2, 0.2] and penalty > 0
    with pytest.raises(ValueError, match="jac_reg_increment_every=-1 is invalid; allowed: an integer >= 0"):
        bertode.BertODEConfig(mode="deq", jac_reg_increment_every=-1)


def test_pretraining_runs_the_layer_unrolled_first(batch):
    model = deq_model(bertode.BertODEForMaskedLM, deq_pretrain_steps=2, deq_pretrain_depth=3)
    seen = []
    for _ in range(3):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        seen.append(model.solver_stats().get("pretrain", False))
    assert seen == [True, True, False]
    assert model.solver_stats()["converged_fraction"] == 1.0


def test_weight_norm_keeps_the_function_and_round_trips(batch, tmp_path):
    from bertode.layers.deq import apply_weight_norm

    plain = deq_model().eval()

    reference = deq_model().eval()
    reference.load_state_dict(plain.state_dict())
    apply_weight_norm(reference.encoder.layer)
    with torch.no_grad():
        expected = plain(**batch).last_hidden_state
        assert torch.allclose(reference(**batch).last_hidden_state, expected, atol=1e-5)
    reference.config.deq_weight_norm = True
    reference.save_pretrained(tmp_path)
    loaded = bertode.BertODEModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).last_hidden_state, expected, atol=1e-5)


def test_spectral_radius_is_reported_at_eval(batch):
    model = deq_model(deq_spectral_radius=True, deq_tol=1e-10, deq_max_iter=100).double().eval()
    f, z0 = map_and_state(model, batch, torch.float64)
    model(**batch)
    radius = model.solver_stats()["spectral_radius"]
    # Plain fixed-point iteration contracts asymptotically at the spectral radius.
    history = SOLVERS["fixed_point"](f, z0, max_iter=30, tol=1e-30)[1].history
    rate = (history[25] / history[15]) ** 0.1
    assert 0 < radius < 1 and abs(radius - rate) <= 0.15, (radius, rate)


WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"


def _wikitext_batches(vocab_size=500, seq=32, rows=16):
    """Word-level MLM batches from WikiText-2 valid: top words, 15 % masked, fixed seed."""
    words = (WIKITEXT / "valid.txt").read_text(encoding="utf-8").split()[:60_000]
    counts = Counter(words)
    vocab = {w: i + 3 for i, (w, _) in enumerate(counts.most_common(vocab_size - 3))}  # 0 pad, 1 mask, 2 unk
    ids = torch.tensor([vocab.get(w, 2) for w in words])
    sequences = ids[: len(ids) // seq * seq].view(-1, seq)
    generator = torch.Generator().manual_seed(0)

    def masked(chunk):
        labels = chunk.clone()
        chosen = torch.rand(chunk.shape, generator=generator) < 0.15
        labels[~chosen] = -100
        return dict(input_ids=chunk.masked_fill(chosen, 1), attention_mask=torch.ones_like(chunk), labels=labels)

    held_out = masked(sequences[-rows:])
    return [masked(sequences[i * rows:(i + 1) * rows]) for i in range(len(sequences) // rows - 1)], held_out


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason="../shared/data/wikitext-2 is not beside the repository")
def test_short_training_on_wikitext_lowers_the_mlm_loss():
    train, held_out = _wikitext_batches()
    model = deq_model(bertode.BertODEForMaskedLM, vocab_size=500, max_position_embeddings=32,
                      deq_tol=1e-3, deq_max_iter=20, jac_reg_weight=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            loss = model(**held_out).loss.item()
        model.train()
        return loss

    before = held_out_loss()
    iterations = []
    for step in range(60):
        loss = model(**train[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        iterations.append(model.solver_stats()["forward_iterations"])
    after = held_out_loss()
    assert after <= before - 1.0, (before, after)
    assert all(1 < n <= 20 for n in iterations) and model.solver_stats()["skipped_batches"] == 0


def test_broyden_restarts_instead_of_overflowing(batch):
    """A hard map (qkv injection, weights x3): Broyden's low-rank model can propose huge
    steps; it must restart rather than evaluate f at an overflowing state."""
    for seed in range(3):
        model = deq_model(seed=seed, deq_injection="qkv").eval()
        with torch.no_grad():
            for parameter in model.encoder.parameters():
                parameter.mul_(3)
        f, z0 = map_and_state(model, batch)
        with torch.no_grad():
            z, info = SOLVERS["broyden"](f, z0, max_iter=100, tol=1e-4)
        assert bool(torch.isfinite(z).all()) and info.history[-1] < info.history[0], (seed, info.history[-3:])
