"""Oracles for the training side: dropout's expectation, `evaluate`'s reduction, the WordPiece
merge order, and losses that do not depend on how a batch is split.

Each test asserts against something the code under test does not compute: a statistical
expectation with its bound stated from the sample count, a float64 recomputation from the
logits written here, a merge order derived by hand from the documented tie-break rule, a
pinned hash, or the whole batch's loss.
"""

import hashlib
import math

import pytest
import torch

import bertode
from bertode.layers.dropout import dropout, keep_mask, split_invariant
from bertode.layers.encoder import Pass
from bertode.training.corpus import SPECIAL_TOKENS
from bertode.training.lm import evaluate, fixed_eval_batches
from bertode.training.objective import CausalLanguageModel, MaskedLanguageModel
from bertode.training.wordpiece import train_vocabulary
from conftest import tiny_ode_config


# --- 1. dropout: E[mask] = 1, and the mean of many training forwards is the eval forward --------------------
P = 0.1
DRAWS = (1000, 1000)  # 10^6 draws: the mean of the mask has sd sqrt(p / ((1 - p) n)) = 3.3e-4, so 1e-3 is 3 sigma


@pytest.mark.parametrize("inside", [False, True], ids=["torch_generator", "split_invariant"])
def test_the_keep_mask_and_dropout_have_mean_one_over_a_million_draws(inside):
    torch.manual_seed(0)
    split = split_invariant(7, torch.arange(DRAWS[0]), DRAWS[0]) if inside else torch.enable_grad()
    with split:
        mask = keep_mask(torch.empty(DRAWS), P)
        dropped = dropout(torch.ones(DRAWS), P, training=True)  # F.dropout outside the split, x * keep_mask inside
    for values in (mask, dropped):
        assert torch.equal(values.unique(), torch.tensor([0.0, 1 / (1 - P)]))
        assert abs(values.double().mean().item() - 1) <= 1e-3, values.double().mean().item()
        assert abs((values > 0).double().mean().item() - (1 - P)) <= 1e-3  # the keep rate: sd 3e-4


@pytest.mark.parametrize("inside", [False, True], ids=["torch_generator", "split_invariant"])
def test_the_mean_of_training_forwards_of_an_euler_site_is_its_eval_forward(inside):
    """A pre-LN feed-forward site solved by one Euler step is x + m * G(LN(x)): linear in the
    mask m, so E[train output] = x + E[m] G(LN(x)) = the eval output exactly. N copies of one
    sequence draw N independent masks; each element's mean has sd |G| sqrt(p / ((1 - p) N))."""
    torch.manual_seed(0)
    config = tiny_ode_config(num_hidden_layers=1, hidden_dropout_prob=P, norm_position="pre", solver="euler", steps=1)
    site = bertode.BertODEForMaskedLM(config).bert.encoder.layer[0].feed_forward
    copies, x = 4096, torch.randn(1, 8, config.hidden_size)
    with torch.no_grad():
        site.eval()
        expected, _ = site(x, None, Pass(0))
        site.train()
        split = split_invariant(3, torch.arange(copies), copies) if inside else torch.enable_grad()
        with split:
            trained, _ = site(x.expand(copies, -1, -1).contiguous(), None, Pass(0))
    update = (expected - x).abs()[0]  # |G(LN(x))| per element
    sd = update * math.sqrt(P / ((1 - P) * copies))
    error = (trained.mean(0) - expected[0]).abs()
    assert (error <= 5 * sd + 1e-6).all(), (error / sd).max()  # 5 sigma per element (256 elements)
    assert (trained.std(0) > 0.1 * update).any()  # the masks did vary across the copies


# --- 2. evaluate(): the summed cross-entropy over the summed target count ---------------------------------------
class _Vocabulary:
    """What `mask_tokens` reads of a tokenizer."""

    all_special_ids, mask_token_id = [0, 1, 2, 3, 4], 4

    def __len__(self):
        return 64


def _reference(model, batches, objective):
    """Loss, perplexity and accuracy recomputed in float64 from every batch's logits, and the
    mean of the batches' means (what a wrong reduction reports)."""
    total, correct, count, means = 0.0, 0, 0, []
    model.eval()
    with torch.no_grad():
        for inputs, labels in batches:
            logits = model(input_ids=inputs).logits.double()
            if objective.causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
            chosen = labels != -100
            log_p = logits.log_softmax(-1)[chosen].gather(-1, labels[chosen][:, None])[:, 0]
            total += -log_p.sum().item()
            correct += int((logits[chosen].argmax(-1) == labels[chosen]).sum())
            count += int(chosen.sum())
            if len(log_p):
                means.append(-log_p.mean().item())
    return total / count, correct / count, count, sum(means) / len(means)


@pytest.mark.parametrize("objective_class", [MaskedLanguageModel, CausalLanguageModel], ids=["mlm", "clm"])
def test_evaluate_is_the_total_cross_entropy_over_the_total_targets(objective_class):
    torch.manual_seed(0)
    objective = objective_class(_Vocabulary(), probability=0.3)
    config = tiny_ode_config(num_hidden_layers=1, is_decoder=objective.causal, initializer_range=0.5)  # peaked logits
    model = objective.model_class(config)
    rows = torch.randint(5, 64, (7, 12))
    rows[:, 0], rows[:, -1] = 2, 3  # [CLS] ... [SEP], as packed rows are
    batches = fixed_eval_batches(rows, objective, seed=5, batch_size=3)  # 3 + 3 + 1 rows
    counts = [objective.targets(labels) for _, labels in batches]
    assert len(set(counts)) > 1, counts  # unequal target counts: a mean of batch means would differ
    loss, accuracy, count, mean_of_means = _reference(model, batches, objective)
    result = evaluate(model, batches, objective, torch.device("cpu"))
    assert result["target_tokens"] == count == sum(counts)
    assert abs(result["loss"] - loss) <= 1e-5, (result["loss"], loss)
    assert abs(result["perplexity"] - math.exp(loss)) <= 1e-5 * math.exp(loss)
    assert abs(result["accuracy"] - accuracy) <= 1e-12
    assert abs(mean_of_means - loss) > 1e-2  # the oracle tells the two reductions apart on these batches
    again = fixed_eval_batches(rows, objective, seed=5, batch_size=3)  # the masking is fixed by the seed
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


# --- 3. WordPiece: the merge order's tie-break, and the vocabulary of the shipped sample ------------------------
def test_wordpiece_merges_in_the_documented_order_with_ties_broken_by_the_pair():
    """Merges go by count, ties by the pair (left symbol, then right symbol) in string order.
    Words: xy x3, abc x2, bcd x2, pq x1, pqr x2, ps x2, so the pairs start as
    (p,##q) 3, (x,##y) 3; (a,##b) (##b,##c) (b,##c) (##c,##d) (##q,##r) (p,##s) 2 each.
      1. p ##q  (3; 'p' < 'x')          -> pq   pqr = pq ##r: (pq,##r) 2, (##q,##r) 0
      2. x ##y  (3)                     -> xy
      3. ##b ##c (2; '#' < 'a' < 'b' < 'p') -> ##bc  abc = a ##bc: (a,##bc) 2, (a,##b) 0
      4. ##c ##d (2)                    -> ##cd  bcd = b ##cd: (b,##cd) 2, (b,##c) 0
      5. a ##bc, 6. b ##cd              -> abc, bcd
      7. p ##s before pq ##r ('p' < 'pq'; by the merged text 'pqr' < 'ps' would come first) -> ps
      8. pq ##r                         -> pqr
    after the specials and the alphabet, sorted."""
    vocab = train_vocabulary(["xy xy xy abc abc bcd bcd pq pqr pqr ps ps"], 100, SPECIAL_TOKENS)
    alphabet = ["##b", "##c", "##d", "##q", "##r", "##s", "##y", "a", "b", "p", "x"]
    assert vocab == SPECIAL_TOKENS + alphabet + ["pq", "xy", "##bc", "##cd", "abc", "bcd", "ps", "pqr"]
    # min_frequency=2: pq (1) alone would not merge; vocab_size stops the merges
    assert train_vocabulary(["pq xy xy"], 100, SPECIAL_TOKENS)[-1] == "xy"
    assert train_vocabulary(["xy xy xy abc abc"], len(SPECIAL_TOKENS) + 6, SPECIAL_TOKENS)[-1] == "xy"


SAMPLE_VOCABULARY_SHA256 = "cab2ade21ee3979a4db05992d68b78da7d0ef18788d64b694df5c43a3c8a9377"


def test_the_default_run_trains_the_pinned_vocabulary_on_the_shipped_sample():
    """`bertode.train`'s default data config (the Moby-Dick sample, 2000 tokens, lowercase):
    the vocabulary in id order, one token a line, hashes to the pinned value. A change to the
    trainer, its tie-break or the sample changes every default run's token ids: update the
    hash only on purpose."""
    from bertode.train import compose
    from bertode.training.corpus import _train_tokenizer
    from bertode.training.documents import documents

    data = compose([]).data
    tokenizer = _train_tokenizer(documents(data, "train"), data.vocab_size, data.lowercase,
                                 data.get("tokenizer_sample_bytes"))
    ids = tokenizer.get_vocab()
    vocab = sorted(ids, key=ids.get)
    assert len(vocab) == data.vocab_size == 2000 and vocab[:5] == SPECIAL_TOKENS
    assert hashlib.sha256("\n".join(vocab).encode()).hexdigest() == SAMPLE_VOCABULARY_SHA256


# --- 5. a streamed run with gradient accumulation, SIGKILLed and resumed ------------------------------------------
KILLER = '''# A test plugin: SIGKILL this process right after metrics.jsonl receives the train record
# of step BERTODE_TEST_KILL_AT (before that step's checkpoint, if any).
import os, signal
from bertode.training import run_log

_write = run_log.RunLog.write


def write(self, record):
    _write(self, record)
    if record.get("kind") == "train" and record["step"] == int(os.environ["BERTODE_TEST_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)


run_log.RunLog.write = write
'''


def test_a_streamed_run_with_grad_accumulation_killed_and_resumed_gives_the_uninterrupted_losses(tmp_path, cache_dir):
    """Two micro-batches a step, each drawn from the stream and masked by its own seed, with
    dropout on: a run SIGKILLed after step 5 (checkpoint at 4) and resumed redoes step 5 and
    logs the losses of the run that was never interrupted, bit for bit."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from test_train import _losses, run_train, small

    overrides = small(cache_dir, "data.streaming=true", "data.num_workers=0", "trainer.grad_accumulation=2",
                      "trainer.max_steps=7", "trainer.checkpoint_every=2", "trainer.eval_every=1000",
                      "model.hidden_dropout_prob=0.1", "model.attention_probs_dropout_prob=0.1")
    run_train(tmp_path / "straight", overrides)
    (tmp_path / "bertode_test_killer.py").write_text(KILLER)
    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               BERTODE_PLUGINS="bertode_test_killer", BERTODE_TEST_KILL_AT="5")
    killed = subprocess.run([sys.executable, "-m", "bertode.train", f"hydra.run.dir={run}", *overrides], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "final").exists() and (run / "checkpoints" / "step_00000004").is_dir()
    run_train(run, overrides + ["trainer.resume=auto"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 8)), steps  # step 5 redone once, nothing duplicated
    straight, resumed = _losses(tmp_path / "straight"), _losses(run)
    assert resumed == straight, (straight, resumed)  # exactly
    assert len(set(straight)) == len(straight)  # the losses move: a stuck stream would repeat them


# --- 4. a batch's loss with a regulariser is the sum of its parts' losses ----------------------------------------
def _split_losses(model, inputs, labels, parts, seed=11, by_rows=False):
    """The loss of the whole batch, and the sum of the parts' losses with ``num_items_in_batch``
    the whole batch's target count (as `bertode.train` and HF Trainer weight micro-batches);
    each forward inside `split_invariant` over the global rows, so every row draws the same
    dropout masks and Hutchinson probes wherever it is computed. ``by_rows``: each part's penalty
    weighted by its share of the rows (``penalty_share``, as `bertode.train` passes it)."""
    rows, total = len(inputs), int((labels != -100).sum())
    with split_invariant(seed, torch.arange(rows), rows):
        whole = model(input_ids=inputs, labels=labels, num_items_in_batch=torch.tensor(total))
    pieces = []
    for part in parts:
        with split_invariant(seed, part, rows):
            share = {"penalty_share": len(part) / rows} if by_rows else {}
            pieces.append(model(input_ids=inputs[part], labels=labels[part], num_items_in_batch=torch.tensor(total),
                                **share))
    return whole, pieces


def _labels(inputs, targets_per_row):
    labels = torch.full_like(inputs, -100)
    for row, count in enumerate(targets_per_row):
        labels[row, 1:1 + count] = inputs[row, 1:1 + count]
    return labels


def _regularised_model_and_inputs(mode):
    """A tiny MLM with dropout and a visible penalty (ODE ``rnode`` or a DEQ Jacobian penalty), and a 4 x 10 batch."""
    torch.manual_seed(0)
    if mode == "ode_rnode":
        config = tiny_ode_config(solver="euler", steps=2, regularizer="rnode", regularizer_weight=100.0,
                                 hidden_dropout_prob=0.1)
    else:
        config = tiny_ode_config(mode="deq", deq_max_iter=40, deq_tol=1e-10, jac_reg_weight=0.5, jac_reg_freq=1.0,
                                 hidden_dropout_prob=0.1)
    return bertode.BertODEForMaskedLM(config).train(), torch.randint(5, 64, (4, 10))


@pytest.mark.parametrize("mode", ["ode_rnode", "deq_jacobian"])
def test_the_parts_losses_with_a_regulariser_sum_to_the_whole_batchs(mode):
    """Rows 0-1 and 2-3 as two micro-batches (or two ranks) with 5 targets each: every part's
    loss is its cross-entropy sum over the 10 targets of the batch plus its share (5/10) of its
    penalty, so the two sum to the whole batch's loss (penalty included, at the same probes)."""
    model, inputs = _regularised_model_and_inputs(mode)
    config = model.config
    labels = _labels(inputs, [2, 3, 4, 1])
    whole, pieces = _split_losses(model, inputs, labels, [torch.tensor([0, 1]), torch.tensor([2, 3])])
    cross_entropy = torch.nn.functional.cross_entropy(whole.logits.view(-1, config.vocab_size), labels.view(-1),
                                                      reduction="sum") / 10
    penalty = (whole.loss - cross_entropy).item()
    assert penalty > 1e-2, penalty  # the penalty is a visible part of the loss (a share of 1 would add ~ it again)
    assert abs(sum(p.loss for p in pieces).item() - whole.loss.item()) <= 1e-5, (sum(p.loss for p in pieces), whole.loss)


@pytest.mark.parametrize("mode", ["ode_rnode", "deq_jacobian"])
def test_parts_with_unequal_targets_sum_to_the_whole_batch_when_the_penalty_is_shared_by_rows(mode):
    """Parts holding 2 and 8 of the batch's 10 targets: the penalty is a mean over positions, so the
    parts' penalties must enter with their share of the rows (1/2 each, `penalty_share`, what
    `bertode.train` passes), not of the targets (1/5 and 4/5), for the parts to sum to the whole."""
    model, inputs = _regularised_model_and_inputs(mode)
    labels = _labels(inputs, [1, 1, 4, 4])
    parts = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    whole, pieces = _split_losses(model, inputs, labels, parts, by_rows=True)
    assert abs(sum(p.loss for p in pieces).item() - whole.loss.item()) <= 1e-5, (sum(p.loss for p in pieces), whole.loss)
    _, by_targets = _split_losses(model, inputs, labels, parts)  # the targets' shares: off by (3/10) * (P1 - P0)
    assert abs(sum(p.loss for p in by_targets).item() - whole.loss.item()) > 1e-4


def test_torchrun_with_grad_accumulation_and_rnode_matches_one_process(tmp_path, cache_dir):
    """2 processes x 2 accumulated micro-batches a step with regularizer=rnode (kinetic energy
    and the Hutchinson Jacobian term) and dropout: the losses of one process with the same
    micro-batches. Every row draws its masks and probes from its own stream, and each part's
    penalty enters with its share of the step's rows (`penalty_share`): at weight 100 a share of the
    targets instead is off by ~7e-5."""
    import subprocess
    import sys

    from test_train import _losses, small

    overrides = small(cache_dir, "trainer.device=cpu", "model=ode", "solver=euler", "solver.steps=2", "trainer.max_steps=4",
                      "trainer.batch_size=8", "trainer.grad_accumulation=2", "model.hidden_dropout_prob=0.1",
                      "regularizer=rnode", "regularizer.weight=100.0", "trainer.eval_every=1000")
    runs = {"one": [], "two": ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29583"]}
    for name, launcher in runs.items():
        done = subprocess.run([sys.executable, *launcher, "-m", "bertode.train", f"hydra.run.dir={tmp_path / name}",
                               *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(x - y) for x, y in zip(one, two)) <= 1e-5, (one, two)
