"""`python -m bertode.train` and `python -m bertode.evaluate`: composition of every config
option, short runs of every model/solver/gradient, exact resume, atomic checkpoints,
torchrun, sweeps, bad input, and the final model in transformers' Auto classes."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bertode

from bertode.training import checkpoint
from bertode.training.cli import CONFIG_DIR, group_options
from bertode.training.run_config import build_model_config

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["model", "size", "solver", "sensitivity", "vector_field", "block", "deq", "data", "trainer", "logger", "experiment"]


def small(cache_dir, *overrides):
    """Overrides of a seconds-long run: tiny model, short rows, 3 steps."""
    return [f"data.cache_dir={cache_dir}", "data.seq_len=16", "data.vocab_size=500", "data.max_eval_sequences=4",
            "trainer.batch_size=4", "trainer.max_steps=3", "trainer.warmup_steps=1", "trainer.log_every=1",
            "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
            "model.hidden_dropout_prob=0.0", *overrides]


def compose_train(overrides):
    from bertode.train import compose as compose_config

    return compose_config(list(overrides))


def run_train(tmp_path, overrides):
    from bertode.train import train

    result = train(compose_train(overrides), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return result, [r for r in records if r["kind"] == "train"]


def test_every_config_option_composes_into_a_valid_model_config():
    seen = 0
    for group in GROUPS:
        for option in group_options(group):
            extra = ["data.files=[x.txt]"] if option == "text" else []
            extra += ["model=deq"] if group == "sensitivity" and option in bertode.available_sensitivities("deq") else []
            vocab = 300_000 if option == "deq_transformer_wt103" else 100  # its adaptive softmax cuts at 200,000
            build_model_config(compose_train([f"{group}={option}", *extra]), vocab_size=vocab)
            seen += 1
    assert seen >= 35


RUNS = (
    [[f"solver={s}", f"sensitivity={g}"] for s in ("euler", "midpoint", "rk4", "dopri5", "tsit5") for g in ("autograd", "adjoint")]
    + [["model=bert"], ["model=deq"], ["model=deq", "sensitivity=phantom", "deq.solver=broyden"],
       ["model=deq", "sensitivity=unrolled", "deq.jac_reg_weight=0.5", "deq.pretrain_steps=1"],
       ["model=deq", "deq.injection=qkv", "deq.solver=fixed_point", "deq.damping=0.5"],
       ["sensitivity=interpolated_adjoint", "solver=rk4"],
       ["vector_field=add_norm"], ["vector_field=time_residual", "solver=rk4", "solver.steps=2"],
       ["block=rk2"], ["block=rk2_gated"], ["block=rk4"], ["solver.ode_backend=torchdiffeq", "solver=dopri5"],
       ["model.weight_tying=true"], ["logger=tensorboard"], ["trainer.grad_accumulation=2"],
       ["model=deq", "trainer.compile=true", "trainer.compile_backend=aot_eager"],
       ["solver=rk4", "trainer.compile=model", "trainer.compile_backend=aot_eager"]]
)


@pytest.mark.parametrize("overrides", RUNS, ids=lambda o: ",".join(o))
def test_three_step_run(tmp_path, cache_dir, overrides):
    speed = (["solver.atol=1e-2", "solver.rtol=1e-2"] if any(s in overrides for s in ("solver=dopri5", "solver=tsit5")) else []
             ) + (["deq.max_iter=12"] if "model=deq" in overrides else [])
    result, records = run_train(tmp_path, small(cache_dir, *overrides, *speed))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert math.isfinite(result["eval"]["loss"])
    if "model=deq" in overrides:
        assert all(r["forward_iterations"] >= 1 for r in records)
    elif "model=bert" not in overrides:
        assert all(r["nfe_forward"] >= 2 for r in records)
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_main_job_learns_beyond_the_unigram_baseline_and_loads_in_a_pipeline(tmp_path, cache_dir):
    """`python -m bertode.train` with no arguments (the run directory and cache aside)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    env = dict(os.environ, BERTODE_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, "-m", "bertode.train", f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MLM loss" in run.stdout and "perplexity" in run.stdout
    summary = json.loads((tmp_path / "final" / "train_results.json").read_text())
    assert summary["eval"]["loss"] < summary["unigram_baseline"] - 0.25, summary
    final = tmp_path / "final"
    model = AutoModelForMaskedLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    predictions = pipeline("fill-mask", model=model, tokenizer=tokenizer)("call me [MASK].")
    assert len(predictions) == 5 and all(0 <= p["score"] <= 1 for p in predictions)


def straight_and_resumed(tmp_path, common):
    """The train records of a 6-step run of ``small`` overrides ``common`` (checkpoints every 3
    steps), and of the same run "interrupted" after step 3 by a token budget, then resumed in
    the same directory: steps 4-6 of each."""
    _, straight = run_train(tmp_path / "straight", common)
    interrupted = tmp_path / "interrupted"
    run_train(interrupted, common + [f"trainer.max_tokens={3 * 4 * 16}"])
    _, records = run_train(interrupted, common + ["trainer.resume=auto"])
    resumed = [r for r in records if r["step"] > 3][-3:]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    return straight, resumed


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, cache_dir):
    common = small(cache_dir, "trainer.max_steps=6", "trainer.checkpoint_every=3", "model.hidden_dropout_prob=0.1",
                   "model=deq", "deq.jac_reg_weight=0.1", "deq.jac_reg_freq=0.5",
                   "deq.pretrain_steps=4")  # the warm-up spans the interruption
    straight, resumed = straight_and_resumed(tmp_path, common)
    for a, b in zip(straight[3:], resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["loss"], b["loss"])


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    script = f"""
import sys, time, torch
from pathlib import Path
from bertode.training import checkpoint
model = torch.nn.Linear(4, 4)
folder = Path({str(tmp_path)!r})
checkpoint.save(folder, 1, model, {{"step": 1}})
real_save = torch.save
def slow_save(obj, path, *a, **k):
    with open(path, "wb") as stream:
        stream.write(b"partial")
        stream.flush()
        (folder / "writing").touch()
        time.sleep(60)
torch.save = slow_save
checkpoint.save(folder, 2, model, {{"step": 2}})
"""
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (tmp_path / "writing").exists():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    target = checkpoint.latest(tmp_path)
    assert target is not None and target.name == "step_00000001"
    assert checkpoint.load(target, torch.nn.Linear(4, 4))["step"] == 1


def _python(*args, cwd, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


@pytest.mark.parametrize("solver,world", [("rk4", 2), ("euler", 4)])
def test_torchrun_matches_one_process_with_dropout_on(tmp_path, cache_dir, solver, world):
    """Each global row draws its dropout masks from its own stream (bertode.layers.dropout), so
    2 or 4 processes give one process's losses with hidden and attention dropout on; the
    other ranks create no run directory of their own."""
    overrides = small(cache_dir, "trainer.device=cpu", "model=ode", f"solver={solver}", "trainer.max_steps=10",
                      "trainer.batch_size=8", "model.hidden_dropout_prob=0.1", "model.attention_probs_dropout_prob=0.1",
                      "trainer.eval_every=1000")
    one = _python("-m", "bertode.train", f"hydra.run.dir={tmp_path / 'one'}", *overrides, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    many = _python("-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={29517 + world}",
                   "-m", "bertode.train", *overrides, cwd=tmp_path)  # Hydra's default, time-stamped run directory
    assert many.returncode == 0, many.stderr[-3000:]
    made = [p.parent for p in tmp_path.glob("outputs/*/*/.hydra")]
    assert len(made) == 1, made  # rank 0's only
    a, b = _losses(tmp_path / "one"), _losses(made[0])
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
    assert max(abs(x - y) for x, y in zip(a[1:], a[:-1])) > 1e-3  # it trains (the losses move)


def test_multirun_sweep_writes_one_directory_per_run(tmp_path, cache_dir):
    result = _python("-m", "bertode.train", "-m", "solver=euler,rk4", f"hydra.sweep.dir={tmp_path}",
                     *small(cache_dir, "trainer.max_steps=2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/final"))
    assert [r.name for r in runs] == ["0", "1"]
    chosen = [(r / ".hydra" / "overrides.yaml").read_text() for r in runs]
    assert "solver=euler" in chosen[0] and "solver=rk4" in chosen[1]


def _bad(tmp_path, cache_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    one_line = tmp_path / "one_line.txt"
    one_line.write_text("a single line of text\n")
    no_gpu = [] if torch.cuda.is_available() else [
        (["trainer=gpu"], "trainer.device='cuda' is invalid here: no CUDA device is visible")]
    return no_gpu + [
        (["data=text", f"data.files=[{tmp_path / 'missing.txt'}]"], "data.files: '"),
        # silent nonsense before: gradient ascent, an untrained "final" model, ...
        (["trainer.grad_clip=-1"], "trainer.grad_clip=-1 is invalid; allowed: null, 0 (no clipping) or a number > 0"),
        (["trainer.max_time=-5"], "trainer.max_time=-5 is invalid"),
        (["trainer.betas=[0.9,1.5]"], "trainer.betas=[0.9, 1.5] is invalid; allowed: two numbers in [0, 1)"),
        (["trainer.weight_decay=-1"], "trainer.weight_decay=-1 is invalid"),
        (["trainer.min_lr_ratio=2"], "trainer.min_lr_ratio=2 is invalid"),
        (["trainer.keep_checkpoints=-1"], "trainer.keep_checkpoints=-1 is invalid"),
        (["trainer.num_threads=-2"], "trainer.num_threads=-2 is invalid"),
        (["model.hidden_dropout_prob=1.5"], "model.hidden_dropout_prob=1.5 is invalid; allowed: a probability in [0, 1)"),
        (["seed=abc"], "seed='abc' is invalid; allowed: an integer >= 0"),
        (["foo=1"], "foo=1 is invalid: no such key (give +foo=1 to add one)"),
        (["trainer.foo=1"], "trainer.foo=1 is invalid: no such option; allowed: trainer.device"),
        (["data=text", f"data.files=[{empty}]"], "contain no text"),
        (["data=text", f"data.files=[{latin}]"], "is not UTF-8 text"),
        (["data=text", f"data.files=[{one_line}]"], "1 line(s) of text are too few to hold out an eval split"),
        (["data.seq_len=1024"], "data.seq_len=1024 is invalid; allowed: <= model.max_position_embeddings=512"),
        (["solver=heun3"], "solver='heun3' is invalid; allowed: 'default', 'dopri5', 'euler'"),
        (["solver=dopri5", "solver.atol=-1e-3"], "solver.atol=-0.001 is invalid; allowed: a finite number > 0"),
        (["trainer.batch_size=3", "trainer.grad_accumulation=2"], "trainer.batch_size=3 is invalid"),
        (["trainer.schedule=foo"], "trainer.schedule='foo' is invalid; allowed: 'linear', 'cosine'"),
        (["trainer.compile=maybe"], "trainer.compile='maybe' is invalid; allowed: true, false, 'auto', 'model', 'fields'"),
        (["model=bert", "trainer.compile=fields"], "trainer.compile='fields' is invalid for a discrete model"),
        (["trainer.compile_backend=aot_eager", "trainer.compile_mode=max-autotune"],
         "trainer.compile_mode='max-autotune' is invalid with trainer.compile_backend='aot_eager'"),
        (["trainer.compile_backend=tensorrt"], "trainer.compile_backend='tensorrt' is invalid; allowed: 'aot_eager',"),
        (["data.mlm_probability=1.5"], "data.mlm_probability=1.5 is invalid; allowed: a number in (0, 1)"),
        (["model.num_attention_heads=5"], "model.num_attention_heads=5 is invalid; allowed: a divisor of hidden_size"),
        (["model.mode=foo"], "model.mode='foo' is invalid; allowed: 'ode', 'discrete', 'deq'"),
        (["model.norm_position=middle"], "model.norm_position='middle' is invalid; allowed: 'post', 'pre'"),
        (["model.hidden_size=-4"], "model.hidden_size=-4 is invalid; allowed: an integer >= 1"),
        (["model.intermediate_size=0"], "model.intermediate_size=0 is invalid; allowed: an integer >= 1"),
        (["model.num_hidden_layers=0"], "model.num_hidden_layers=0 is invalid; allowed: an integer >= 1"),
        (["model.t_end=2"], "model.t_end=2 is invalid: no such option (did you mean solver.t_end?)"),
        (["solver.step=2"], "solver.step=2 is invalid: no such option (did you mean solver.steps?)"),
        (["seeed=3"], "seeed=3 is invalid: no such key (did you mean seed?)"),
        (["size=huge"], "size='huge' is invalid; allowed: 'base', 'mini', 'small', 'tiny'"),
        (["solver=rk4", "solver.steps=0"], "solver.steps=0 is invalid; allowed: an integer >= 1"),
        (["solver=dopri5", "solver.rtol=0"], "solver.rtol=0 is invalid; allowed: a finite number > 0"),
        (["model=deq", "deq.max_iter=-1"], "deq.max_iter=-1 is invalid; allowed: an integer >= 1"),
        (["model=deq", "sensitivity=adjoint"], "sensitivity='adjoint' is invalid with model.mode='deq'; allowed: 'ift'"),
        (["model=ode", "sensitivity=ift"], "sensitivity='ift' is invalid with model.mode='ode'; allowed: 'adjoint'"),
        (["data.source=foo"], "data.source='foo' is invalid; allowed: 'sample', 'text', 'hub'"),
        (["data.eval_fraction=1.5"], "data.eval_fraction=1.5 is invalid; allowed: a number in (0, 1)"),
        (["data.vocab_size=3"], "data.vocab_size=3 is invalid; allowed: an integer > 5"),
        (["data.seq_len=4"], "data.seq_len=4 is invalid; allowed: an integer >= 8"),
        (["data.lowercase=maybe"], "data.lowercase='maybe' is invalid; allowed: true, false"),
        (["data.max_eval_sequences=0"], "data.max_eval_sequences=0 is invalid; allowed: null (all) or an integer >= 1"),
        ([f"data.tokenizer={tmp_path / 'no-tokenizer'}"], "is not a directory with a saved tokenizer"),
        (["data=wikitext2", "data.hub_path=null"], "data.hub_path=None is invalid with data.source='hub'"),
        (["data=text", f"data.files=[{tmp_path / 'missing-*.txt'}]"], "matches no file"),
        (["trainer.lr=-1"], "trainer.lr=-1 is invalid; allowed: a number > 0"),
        (["trainer.lr=abc"], "trainer.lr='abc' is invalid; allowed: a number > 0"),
        (["trainer.max_steps=-1"], "trainer.max_steps=-1 is invalid; allowed: an integer >= 1"),
        (["trainer.max_steps=1.5"], "trainer.max_steps=1.5 is invalid; allowed: an integer >= 1"),
        (["trainer.max_tokens=-1"], "trainer.max_tokens=-1 is invalid; allowed: null or an integer >= 1"),
        (["trainer.log_every=0"], "trainer.log_every=0 is invalid; allowed: an integer >= 1"),
        (["trainer.eval_every=0"], "trainer.eval_every=0 is invalid; allowed: an integer >= 1"),
        (["trainer.checkpoint_every=0"], "trainer.checkpoint_every=0 is invalid; allowed: an integer >= 1"),
        (["trainer.warmup_steps=-1"], "trainer.warmup_steps=-1 is invalid; allowed: an integer >= 0"),
        (["trainer.grad_accumulation=0"], "trainer.grad_accumulation=0 is invalid; allowed: an integer >= 1"),
        (["trainer.batch_size=0"], "trainer.batch_size=0 is invalid; allowed: an integer >= 1"),
        (["trainer.precision=fp16"], "trainer.precision='fp16' is invalid; allowed: 'fp32', 'bf16'"),
        (["trainer.device=tpu"], "trainer.device='tpu' is invalid; allowed: 'auto', 'cpu', 'cuda'"),
        (["trainer.deterministic=maybe"], "trainer.deterministic='maybe' is invalid; allowed: true, false"),
        (["trainer.resume=sometimes"], "trainer.resume='sometimes' is invalid; allowed: 'never', 'auto' or a checkpoint"),
        (["logger.kind=foo"], "logger.kind='foo' is invalid; allowed: 'jsonl', 'tensorboard', 'wandb'"),
        (["plugins=[no_such_module_here]"], "plugins='no_such_module_here' is invalid: No module named"),
    ] + ([] if importlib.util.find_spec("wandb") else [
        (["logger=wandb"], "logger.kind='wandb' is invalid here: the 'wandb' package is not installed")])


def _snapshot(*roots):
    return {root: sorted(str(p.relative_to(root)) for p in root.rglob("*")) for root in roots}


def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, cache_dir, monkeypatch, capsys):
    """Each bad input: exit 2, exactly one line on stderr, and no file written anywhere
    (no run directory, nothing in the working directory or the data cache)."""
    from bertode.train import main

    cases = _bad(tmp_path, cache_dir)
    assert len(cases) >= 60
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _snapshot(tmp_path, cache_dir)
    for index, (overrides, expected) in enumerate(cases):
        run_dir = tmp_path / f"run{index}"
        monkeypatch.setattr(sys, "argv", ["bertode.train", f"hydra.run.dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides])
        with pytest.raises(SystemExit) as exit_info:
            main()
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2, (overrides, error)
        assert error.count("\n") == 0 and error.startswith("error: ") and expected in error, (overrides, error)
        assert _snapshot(tmp_path, cache_dir) == before, overrides  # checked before Hydra creates anything


def test_evaluate_bad_input_gives_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from bertode.evaluate import main

    model_dir = tmp_path / "model"
    bertode.BertODEConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=64).save_pretrained(model_dir)
    (model_dir / "tokenizer_config.json").write_text("{}")
    folders = {}
    for name, config_text in {"garbage": "{not json", "bert": '{"model_type": "bert"}', "list": "[1, 2]"}.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "config.json").write_text(config_text)
    no_tokenizer = tmp_path / "no-tokenizer"
    bertode.BertODEConfig(vocab_size=64, hidden_size=32, num_attention_heads=4).save_pretrained(no_tokenizer)
    cases = [([f"checkpoint={tmp_path / 'missing'}"], "is invalid; allowed: a directory written by save_pretrained"),
             ([f"checkpoint={folders['garbage']}"], "its config.json is not JSON"),
             ([f"checkpoint={folders['bert']}"], "its model_type is 'bert'; allowed: a bertode model's directory"),
             ([f"checkpoint={folders['list']}"], "its model_type is None"),
             ([f"checkpoint={no_tokenizer}"], "it holds no tokenizer"),
             (["split=foo"], "split='foo' is invalid; allowed: 'eval', 'train'"),
             (["batch_size=0"], "batch_size=0 is invalid"), (["seed=abc"], "seed='abc' is invalid"),
             (["max_sequences=-1"], "max_sequences=-1 is invalid"), (["device=gpu7"], "device='gpu7' is invalid"),
             ([], "checkpoint is missing; allowed: checkpoint=DIR"),
             (["data.seq_len=4"], "data.seq_len=4 is invalid"), (["foo=1"], "foo=1 is invalid: no such key"),
             (["data.source=foo"], "data.source='foo' is invalid"),
             (["data=text", f"data.files=[{tmp_path / 'missing.txt'}]"], "data.files: '"),
             (["plugins=[no_such_module_here]"], "plugins='no_such_module_here' is invalid"),
             (["batchsize=4"], "batchsize=4 is invalid: no such key (did you mean batch_size?)")]
    if not torch.cuda.is_available():
        cases.append((["device=cuda"], "device='cuda' is invalid here: no CUDA device is visible"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _snapshot(tmp_path)
    for index, (overrides, expected) in enumerate(cases):
        run_dir = tmp_path / f"eval{index}"
        given = not overrides or any(o.startswith("checkpoint=") for o in overrides)  # [] : no checkpoint at all
        checkpoint_arg = [] if given else [f"checkpoint={model_dir}"]
        monkeypatch.setattr(sys, "argv", ["bertode.evaluate", f"hydra.run.dir={run_dir}", *checkpoint_arg, *overrides])
        with pytest.raises(SystemExit) as exit_info:
            main()
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and error.count("\n") == 0 and expected in error, (overrides, error)
        assert _snapshot(tmp_path) == before, overrides


def test_evaluate_cli_reproduces_the_final_eval(tmp_path, cache_dir, monkeypatch, capsys):
    result, _ = run_train(tmp_path, small(cache_dir))
    from bertode.evaluate import main

    monkeypatch.setattr(sys, "argv", ["bertode.evaluate", f"checkpoint={tmp_path / 'final'}", f"data.cache_dir={cache_dir}",
                                      "data.seq_len=16", "data.vocab_size=500", "data.max_eval_sequences=4",
                                      f"hydra.run.dir={tmp_path / 'eval'}"])
    main()
    written = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert abs(written["loss"] - result["eval"]["loss"]) <= 1e-5
    assert "perplexity" in capsys.readouterr().out


def test_configs_ship_inside_the_package():
    assert CONFIG_DIR.parent.name == "bertode" and (CONFIG_DIR / "train.yaml").is_file()
    assert (ROOT / "configs").resolve() == CONFIG_DIR


WIKITEXT = ROOT / ".." / "shared" / "data" / "wikitext-2"


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason="../shared/data/wikitext-2 is not beside the repository")
def test_hub_data_path_through_datasets_with_local_files(tmp_path, cache_dir):
    """data=wikitext2 goes through `datasets.load_dataset`; offline, a local folder with
    train/validation text files stands in for the hub dataset."""
    from bertode.training.corpus import prepare

    folder = tmp_path / "wikitext_local"
    folder.mkdir()
    for source, split in (("valid.txt", "train"), ("test.txt", "validation")):
        lines = (WIKITEXT / source).read_text(encoding="utf-8").splitlines()[:800]
        (folder / f"{split}.txt").write_text("\n".join(lines), encoding="utf-8")
    cfg = compose_train(["data=wikitext2", f"data.hub_path={folder}", "data.hub_name=null",
                         f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=800", "data.seq_len=32"])
    corpus = prepare(cfg.data)
    assert corpus.train.shape[1] == 32 and len(corpus.train) > 100 and len(corpus.eval) > 50
    text = corpus.tokenizer.decode(corpus.train[0, 1:-1])
    assert text.startswith("= homarus gammarus =")  # the first line of WikiText-2 valid
    again = prepare(cfg.data)
    assert again.cache == corpus.cache and torch.equal(again.train[:], corpus.train[:])


def test_mlm_masking_follows_bert_and_skips_special_tokens(cache_dir):
    from bertode.training.corpus import prepare
    from bertode.training.objective import mask_tokens

    corpus = prepare(compose_train(small(cache_dir)).data)
    tokenizer = corpus.tokenizer
    rows = corpus.train[:64].clone()
    rows[:, 5] = tokenizer.unk_token_id
    rows[:, 6] = tokenizer.mask_token_id
    inputs, labels = mask_tokens(rows, tokenizer, 0.15, torch.Generator().manual_seed(0))
    special = torch.isin(rows, torch.tensor(tokenizer.all_special_ids))
    assert bool((labels[special] == -100).all())
    chosen = labels != -100
    assert abs(chosen.sum().item() / (~special).sum().item() - 0.15) < 0.02
    masked = (inputs[chosen] == tokenizer.mask_token_id).float().mean().item()
    kept = (inputs[chosen] == rows[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.05 and 0.07 < kept < 0.16  # 10 % kept, plus random draws of the same id
    assert torch.equal(inputs[~chosen], rows[~chosen])


def test_cache_entry_depends_on_the_tokenizer(cache_dir, tmp_path):
    from bertode.training.corpus import prepare

    cfg = compose_train(small(cache_dir)).data
    own = prepare(cfg)
    other = prepare(compose_train(small(cache_dir, "data.vocab_size=300")).data)
    assert prepare(cfg, tokenizer=other.tokenizer).cache != prepare(cfg, tokenizer=own.tokenizer).cache
