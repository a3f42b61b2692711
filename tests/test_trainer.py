"""`transformers.Trainer` on DEQ models: the model's own semantics travel with it.

A batch whose implicit backward turns non-finite is skipped (no parameter moves) and
counted, and training goes on; the unrolled warm-up counter lives in the checkpoint, so
a run resumed mid-warm-up ends where the uninterrupted run ends; `SolverStatsCallback`
puts the solver's numbers into Trainer's logs."""

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import bertode

NAN_ON_CALL = {"target": None, "calls": 0}


@bertode.register_fixed_point_solver("anderson_nan_on_call")
def anderson_nan_on_call(f, z0, max_iter, tol, stop_mode="rel", damping=1.0, memory=5, name="deq"):
    """Anderson, except that on the chosen call the map returns NaN (a failing backward)."""
    NAN_ON_CALL["calls"] += 1
    if NAN_ON_CALL["calls"] == NAN_ON_CALL["target"]:
        def poisoned(z):
            return f(z) * float("nan")

        return bertode.get_fixed_point_solver("anderson")(poisoned, z0, max_iter, tol, stop_mode, damping, memory, name)
    return bertode.get_fixed_point_solver("anderson")(f, z0, max_iter, tol, stop_mode, damping, memory, name)


TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, mode="deq")


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=8):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 64, (n, seq), generator=generator)
        self.labels = torch.where(torch.rand(n, seq, generator=generator) < 0.3, self.ids, torch.full_like(self.ids, -100))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def _args(tmp_path, **extra):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                   save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                   dataloader_num_workers=0)
    return TrainingArguments(**{**options, **extra})


class ParameterMoves(TrainerCallback):
    """Max |change| of any parameter over each optimizer step."""

    def __init__(self):
        self.before, self.moves = None, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.moves.append(max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), self.before)))


def test_a_non_finite_implicit_backward_is_skipped_counted_and_training_continues(tmp_path):
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig(
        **TINY, deq_on_nonfinite="skip", deq_backward_solver="anderson_nan_on_call"))
    NAN_ON_CALL.update(target=2, calls=0)  # the second step's backward fails
    moves = ParameterMoves()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=Rows(),
                      callbacks=[bertode.SolverStatsCallback(), moves])
    trainer.train()
    assert NAN_ON_CALL["calls"] == 4 and model.skipped_batches == 1
    assert moves.moves[1] == 0.0 and all(move > 0 for i, move in enumerate(moves.moves) if i != 1), moves.moves
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4 and all(math.isfinite(entry["loss"]) for entry in logged)
    # SolverStatsCallback: DEQ iterations and NFE in Trainer's logs
    assert all(entry["solver/forward_iterations"] >= 1 and entry["solver/nfe_forward"] >= 1 for entry in logged)
    assert logged[1]["solver/skipped_batches"] == 1 and logged[0]["solver/skipped_batches"] == 0


def test_without_skip_the_same_backward_raises(tmp_path):
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**TINY, deq_backward_solver="anderson_nan_on_call"))
    NAN_ON_CALL.update(target=1, calls=0)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=Rows())
    with pytest.raises(bertode.DEQSolveError, match="backward"):
        trainer.train()


class StopAfter(TrainerCallback):
    """Interrupt the run after ``step`` optimizer steps (its checkpoint written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _warm_up_model():
    torch.manual_seed(0)
    return bertode.BertODEForMaskedLM(bertode.BertODEConfig(**TINY, deq_pretrain_steps=3, deq_pretrain_depth=2))


def test_a_trainer_checkpoint_resumed_mid_warm_up_continues_the_warm_up(tmp_path):
    uninterrupted = _warm_up_model()
    Trainer(model=uninterrupted, args=_args(tmp_path / "a", max_steps=5), train_dataset=Rows()).train()

    interrupted = _warm_up_model()
    args = _args(tmp_path / "b", max_steps=5, save_strategy="steps", save_steps=2)
    Trainer(model=interrupted, args=args, train_dataset=Rows(), callbacks=[StopAfter(2)]).train()
    assert interrupted.bert.encoder.counters()["training_forwards"] == 2  # inside the 3-step warm-up
    resumed = _warm_up_model()
    Trainer(model=resumed, args=args, train_dataset=Rows()).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))

    assert resumed.bert.encoder.counters() == uninterrupted.bert.encoder.counters()
    assert resumed.bert.encoder.counters()["training_forwards"] == 5
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert (a - b).abs().max() <= 1e-6, name


def test_save_pretrained_carries_the_counters(tmp_path):
    model = _warm_up_model().train()
    ids = torch.randint(5, 64, (2, 8))
    for _ in range(2):
        model(ids, labels=ids)
    model.save_pretrained(tmp_path)
    loaded = bertode.BertODEForMaskedLM.from_pretrained(tmp_path)
    assert loaded.bert.encoder.counters() == model.bert.encoder.counters() == {
        "training_forwards": 2, "skipped_batches": 0, "nonconverged_solves": 0}
