"""The README stays true and short: its group table covers every config group and option,
its choices tables are the registries' (`python -m bertode.choices`, which also answers
--help), every `BertODEConfig` field is documented, its code runs (every Python block and
every shell command that runs offline, capped to a few seconds of work; the rest marked
with a reason: the rules are the comments above `GIVEN`), and it stays a user's guide
(design notes live in docs/)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bertode
from bertode.training.cli import config_groups, group_options
from bertode.training.groups import REGISTRY_GROUPS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _table_rows(header: str) -> dict:
    start = README.index(header)
    rows = {}
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for group in re.findall(r"`(\w+)`", cells[0]):
            rows[group] = " ".join(cells[1:])
    return rows


def _package_dial_choices() -> dict:
    """The depth and exit groups' choices of a user who registered nothing (a fresh process: the tests register
    distributions of their own in this one)."""
    code = ("import json; from bertode.training.groups import DIAL_GROUPS, dial_choices; "
            "print(json.dumps({g: dial_choices(g) for g in DIAL_GROUPS}))")
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_cli_group_table_lists_every_group_and_option():
    rows = _table_rows("| group | options | sets |")
    assert sorted(rows) == config_groups()
    dial = _package_dial_choices()
    for group in config_groups():
        if group in REGISTRY_GROUPS:
            assert "registered" in rows[group], group  # options: the choices tables below
            continue
        named = set(re.findall(r"`([\w.]+)`", rows[group]))
        missing = set(dial[group] if group in dial else group_options(group)) - named
        assert not missing, (group, missing)


def test_choices_tables_are_the_registries():
    """Run in a fresh process: the tables of a user who registered nothing."""
    tables = subprocess.run([sys.executable, "-m", "bertode.choices"], capture_output=True, text=True, check=True).stdout
    block = README[README.index("<!-- choices:begin -->") + len("<!-- choices:begin -->"):README.index("<!-- choices:end -->")]
    assert block.strip() == tables.strip()
    assert all(f"`{name}`" in block for name in ("euler", "dopri5", "adjoint", "ift", "rk2_gated", "anderson", "add_norm"))


def test_every_bertode_config_field_is_documented():
    own = set(bertode.BertODEConfig.__dataclass_fields__) - set(bertode.BertODEConfig.__mro__[1].__dataclass_fields__)
    documented = set(re.findall(r"`(\w+)`", README))
    assert own and not own - documented, own - documented


def test_the_readme_is_a_users_guide():
    assert len(README.splitlines()) <= 230  # a user's guide for three commands; design notes are in docs/
    for doc in ("docs/architecture.md", "docs/extending.md", "docs/solve.md", "docs/testing.md", "docs/results.md"):
        assert (ROOT / doc).is_file() and doc in README + (ROOT / "docs" / "architecture.md").read_text()


def test_vector_field_example_runs_as_written():
    """docs/extending.md's vector-field example (the README points there)."""
    extending = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    block = extending[extending.index("## A vector field"):]
    code = block[block.index("```python") + len("```python"):block.index("```", block.index("```python") + 3)]
    code = code.replace('"scaled_residual"', '"readme_scaled_residual"')  # the registry test owns the README name
    namespace: dict = {}
    exec(compile(code, "docs/extending.md", "exec"), namespace)
    model = namespace["model"]
    field = model.encoder.layer[0].attention.field
    assert type(field).__name__ == "ScaledResidual" and field.scale.item() == 0.5
    out = model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert out.last_hidden_state.shape == (1, 4, model.config.hidden_size)


# --- The README's code runs -------------------------------------------------------------------------------------------
#
# The rule for every fenced block of README.md (test_every_readme_block_runs_or_is_marked):
#   * the line right before the block may hold `<!-- readme-test: skip (<reason>) -->` (the whole block is not run) or
#     `<!-- readme-test: skip "<text>" (<reason>); skip "<text>" (<reason>) -->` (the commands containing <text> are not
#     run); a mark needs a reason, and each `"<text>"` must match a command of its block;
#   * every other block is run: ```python blocks as Python, plain/```bash blocks command by command, and a command that
#     is run must read `python -m <module> ...`; a Python block may use only the names GIVEN without defining them.
# How they run (readme_runs): in a fresh work directory beside a link `shared` -> the repository's ../shared (so
# `../shared/data/...` reads as from the repository root; the commands that read it are skipped where it is absent), with
# a fresh data cache, offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), in README order, each block or command in its own
# process forked from one that imported bertode once (a new process per command, without paying the imports each time).
# The placeholders are files the test makes: `path/to/any/bert`, `path/to/gpt2` (tiny random HF models in the work
# directory), `/path/...` and `/data/...` (under the temporary directory: `/path/to/roberta` a tiny RoBERTa,
# `/data/*.txt` and `/data/*.jsonl` text), `a.csv`/`b.csv` (labelled sentences), `my_module.py` (registers `my_solver`).
# `.../final` is the main job's `final/` (the quickstart's `python -m bertode.train`; for `bertode.generate`, the first
# `objective=clm` run's), `outputs/...` the main job's run directory, `multirun/...` the first sweep's.
# CAPS are appended to every command of a module (replacing the README's value of the same key) so that it stays cheap;
# train and finetune also get `hydra.run.dir=outputs/readme-<line>` (a sweep: `hydra.sweep.dir=multirun/readme-<line>`).
# A command passes when it exits 0 and leaves its evidence (_evidence: a loss line and a final/ model per run, an
# evaluation line per run, the prompt's continuation, results.json, prepare's row count, the report's markdown); a
# Python block, when it runs and defines every name it assigns.

GIVEN = {"input_ids", "attention_mask", "labels"}  # a (2, 8) batch, defined for the Python blocks
CAPS = {
    "bertode.train": ["trainer.max_steps=1", "trainer.batch_size=2", "data.max_eval_sequences=2"],
    "bertode.evaluate": ["data.max_eval_sequences=2"],
    "bertode.generate": ["max_new_tokens=4"],
    "bertode.finetune": ["trainer.epochs=1", "task.max_length=16"],
}
SHARED = ROOT.parent / "shared"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)
MARK = re.compile(r"<!-- readme-test: (.*) -->")
SKIP = re.compile(r'skip(?: "([^"]+)")? \(([^)]+)\)')


def readme_blocks() -> list[dict]:
    """Every fenced block: its first line number, language, text, and the skips marked on the line before it."""
    blocks = []
    for match in FENCE.finditer(README):
        line = README.count("\n", 0, match.start()) + 1
        before = README[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.fullmatch(before.strip())
        skips = []
        if mark:
            entries = [entry.strip() for entry in mark.group(1).split(";")]
            assert all(SKIP.fullmatch(entry) for entry in entries), f"README.md:{line - 1}: bad mark {before!r}"
            skips = [SKIP.fullmatch(entry).groups() for entry in entries]
        blocks.append(dict(line=line + 1, language=match.group(1), text=match.group(2), skips=skips))
    return blocks


def shell_commands(block: dict) -> list[tuple[int, str]]:
    """(line, command) of a shell block: continuation lines joined, comments and blank lines dropped."""
    commands, pending, start = [], "", None
    for number, text in enumerate(block["text"].splitlines(), block["line"]):
        start = number if not pending else start
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        command = (pending + text).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append((start, command))
    return commands


def _free_names(code: str) -> set:
    import ast
    import builtins

    tree = ast.parse(code)
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    bound |= {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
              for a in n.names}
    bound |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    bound |= {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loaded - bound - set(dir(builtins))


def _assigned_names(code: str) -> set:
    import ast

    tree = ast.parse(code)
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets = [node.target] if isinstance(node, ast.AnnAssign) else targets
        names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def _runs(args: list) -> int:
    """How many runs a command makes: the product of its sweep's comma lists (with -m), else 1."""
    if "-m" not in args:
        return 1
    count = 1
    for arg in args:
        key, _, value = arg.partition("=")
        if value and "," in value and not value.startswith(("[", "{", "'", '"')):
            count *= len(value.split(","))
    return count


def readme_jobs() -> list[dict]:
    """Every command and Python block the README runs, in order, with its placeholders resolved and caps appended."""
    import shlex

    jobs, main_dir, clm_dir, sweep_dir = [], None, None, None
    for block in readme_blocks():
        whole = [reason for text, reason in block["skips"] if text is None]
        if whole:
            continue
        if block["language"] == "python":
            jobs.append(dict(id=f"README.md:{block['line']} python", kind="python", line=block["line"],
                             code=block["text"], names=sorted(_assigned_names(block["text"]))))
            continue
        if block["language"] not in ("", "bash", "sh", "shell"):
            continue  # test_every_readme_block_runs_or_is_marked names it
        for line, command in shell_commands(block):
            if any(text and text in command for text, _ in block["skips"]) or not command.startswith("python -m "):
                continue  # marked, or named by test_every_readme_block_runs_or_is_marked
            words = shlex.split(command, comments=True)
            module, args = words[2], words[3:]
            out = f"{'multirun' if '-m' in args else 'outputs'}/readme-{line}"
            if module == "bertode.train":
                if not args:
                    main_dir = main_dir or out
                if "objective=clm" in args and "-m" not in args:
                    clm_dir = clm_dir or out
                if "-m" in args:
                    sweep_dir = sweep_dir or out

            def resolve(word: str) -> str:
                final = clm_dir if module == "bertode.generate" else main_dir
                if "/final" in word and "..." in word:
                    assert final, f"README.md:{line}: no earlier run gives {word}"
                    word = re.sub(r"(?:outputs/)?\.\.\./final", f"{final}/final", word)
                if word == "multirun/...":
                    word = sweep_dir
                if word == "outputs/...":
                    word = main_dir
                return re.sub(r"(?<![\w.])/(path|data)/", r"{tmp}/\1/", word)

            args = [resolve(arg) for arg in args]
            caps = list(CAPS.get(module, []))
            if module in ("bertode.train", "bertode.finetune"):
                caps.append(f"hydra.{'sweep' if '-m' in args else 'run'}.dir={out}")
            capped = {cap.split("=")[0] for cap in caps}
            args = [arg for arg in args if arg.split("=")[0] not in capped] + caps
            jobs.append(dict(id=f"README.md:{line} {module} {' '.join(words[3:])}"[:120], kind="module", line=line,
                             module=module, args=args, out=out, runs=_runs(args), shared="../shared/" in command))
    return jobs


JOBS = readme_jobs()
EXTRA_JOBS = [  # beside the README's commands, in the same run
    dict(id="choices --help", kind="module", module="bertode.choices", args=["--help"]),
    *(dict(id=f"{name} without data.files", kind="module", module="bertode.train", args=[f"experiment={name}"])
      for name in ("wikitext2_mini_5min", "deq_transformer_wt2_cpu")),
]

RUNNER = r'''
import json, os, runpy, signal, sys, time, traceback
jobs = json.loads(sys.stdin.read())
import torch, transformers, hydra, bertode, bertode.training.cli  # imported once; every job forks from here
SETUP = """
import pytest
import torch
_generator = torch.Generator().manual_seed(0)
input_ids = torch.randint(5, 100, (2, 8), generator=_generator)
attention_mask = torch.ones_like(input_ids)
attention_mask[1, 6:] = 0
labels = input_ids.clone()
"""
results = []
for job in jobs:
    sys.stdout.flush(); sys.stderr.flush()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 0
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1); os.dup2(log, 2)
        signal.alarm(job.get("timeout", 300))
        try:
            if job["kind"] == "python":
                namespace = {"__name__": "__main__"}
                exec(SETUP, namespace)
                exec(compile(job["code"], f"README.md:{job['line']}", "exec"), namespace)
                print("README-NAMES " + json.dumps(sorted(namespace)))
            else:
                sys.argv = [job["module"], *job["args"]]
                runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append(dict(rc=os.waitstatus_to_exitcode(status), seconds=round(time.perf_counter() - started, 1)))
print("README-RESULTS " + json.dumps(results))
'''


def _make_placeholders(tmp: Path, work: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast, GPT2Config, GPT2LMHeadModel
    from transformers import RobertaConfig, RobertaForMaskedLM

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=128, max_position_embeddings=64, **small)).save_pretrained(
        work / "path/to/any/bert")
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                eos_token_id=0)).save_pretrained(
        work / "path/to/gpt2")
    text = (ROOT / "bertode/sample_data/moby_dick_train.txt").read_text(encoding="utf-8").splitlines()
    (tmp / "data").mkdir()
    for part in (1, 2):
        lines = [line for line in text[part * 400:(part + 1) * 400] if line.strip()]
        (tmp / "data" / f"part-{part}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / "data" / f"part-{part}.jsonl").write_text("".join(json.dumps({"body": line}) + "\n" for line in lines))
    rows = [(f"a {word} {thing}", int(word in ("good", "great", "fine"))) for word in ("good", "bad", "great", "awful",
            "fine", "poor") for thing in ("film", "book", "meal", "phone", "hotel")]
    for name, part in (("a.csv", rows), ("b.csv", rows[::2])):
        (work / name).write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in part), encoding="utf-8")
    words = sorted({word for t, _ in rows for word in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    roberta = tmp / "path/to/roberta"
    roberta.mkdir(parents=True)
    (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(tmp / "vocab.txt")).save_pretrained(roberta)
    RobertaForMaskedLM(RobertaConfig(vocab_size=len(vocab), max_position_embeddings=80, pad_token_id=0,
                                     bos_token_id=2, eos_token_id=3, **small)).save_pretrained(roberta)
    (work / "my_module.py").write_text(
        "import bertode\n\nbertode.register_solver('my_solver', bertode.ButcherTableau(\n"
        "    c=[0, 1/2, 3/4], a=[[], [1/2], [0, 3/4]], b=[2/9, 1/3, 4/9], order=3))\n", encoding="utf-8")


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """Runs every README job (and EXTRA_JOBS) once; returns id -> (exit status, output, seconds) and the work dir."""
    import os

    if not hasattr(os, "fork"):
        pytest.skip("the README runner forks one process per command (POSIX)")
    tmp = tmp_path_factory.mktemp("readme")
    work = tmp / "work"
    work.mkdir()
    if SHARED.is_dir():
        (tmp / "shared").symlink_to(SHARED, target_is_directory=True)
    _make_placeholders(tmp, work)
    jobs = [job for job in JOBS + EXTRA_JOBS if not job.get("shared") or (SHARED / "data").is_dir()]
    sent = []
    for number, job in enumerate(jobs):
        job = {**job, "log": str(tmp / f"job-{number}.log")}
        if job["kind"] == "module":
            job["args"] = [arg.replace("{tmp}", str(tmp)) for arg in job["args"]]
        sent.append(job)
    env = {**os.environ, "BERTODE_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(sent), cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    line = next((line for line in done.stdout.splitlines() if line.startswith("README-RESULTS ")), None)
    assert line, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(line.split(" ", 1)[1])
    runs = {job["id"]: (result["rc"], Path(job["log"]).read_text(errors="replace"), result["seconds"])
            for job, result in zip(sent, results)}
    print("README jobs, seconds:", {key: value[2] for key, value in runs.items()})
    return runs, work


def _evidence(job: dict, output: str, work: Path) -> None:
    """What the command leaves, beyond exit status 0."""
    module, runs = job.get("module"), job.get("runs", 1)
    if job["kind"] == "python":
        line = next(line for line in output.splitlines() if line.startswith("README-NAMES "))
        assert set(job["names"]) <= set(json.loads(line.split(" ", 1)[1])), job["names"]
    elif module == "bertode.train":
        finals = re.findall(r"^final model: (.+)$", output, re.M)
        assert len(finals) == runs and len(re.findall(r"^step 1/1 \| loss \d+\.\d+", output, re.M)) == runs, output
        assert all((work / final / "model.safetensors").is_file() for final in finals), finals
    elif module == "bertode.evaluate":
        assert len(re.findall(r"loss \d+\.\d+, perplexity \d", output)) == runs, output
    elif module == "bertode.generate":
        assert "the ship" in output, output
    elif module == "bertode.finetune":
        results = json.loads((work / job["out"] / "results.json").read_text())
        assert "accuracy" in json.dumps(results), results
    elif module == "bertode.prepare":
        assert re.search(r"bertode\.prepare: \d+ train rows", output), output
    elif module == "bertode.report":
        assert any((work / "report").glob("*.md")), sorted((work / "report").iterdir())
    else:
        raise AssertionError(f"{module}: no evidence defined; add it to _evidence")


def test_every_readme_block_runs_or_is_marked():
    blocks = readme_blocks()
    assert len(blocks) >= 6 and any(b["language"] == "python" for b in blocks)
    for block in blocks:
        where = f"README.md:{block['line']}"
        assert all(reason.strip() for _, reason in block["skips"]), where
        if any(text is None for text, _ in block["skips"]):
            continue
        if block["language"] == "python":
            assert _free_names(block["text"]) <= GIVEN, (where, _free_names(block["text"]) - GIVEN)
            continue
        assert block["language"] in ("", "bash", "sh", "shell"), f"{where}: run or mark a ```{block['language']} block"
        commands = shell_commands(block)
        for text, reason in block["skips"]:
            assert any(text in command for _, command in commands), f"{where}: skip {text!r} matches no command"
        for line, command in commands:
            if not any(text in command for text, _ in block["skips"]):
                assert command.startswith("python -m "), f"README.md:{line}: mark it, or `python -m ...`: {command}"
    run = [job for job in JOBS if job["kind"] == "module"]
    assert {job["module"] for job in run} >= {"bertode.train", "bertode.evaluate", "bertode.generate",
                                               "bertode.finetune", "bertode.prepare", "bertode.report"}


@pytest.mark.parametrize("job", JOBS, ids=[job["id"] for job in JOBS])
def test_readme_code_runs(job, readme_runs):
    runs, work = readme_runs
    if job["id"] not in runs:
        pytest.skip(f"reads ../shared/data, which is not beside the repository ({SHARED})")
    rc, output, _ = runs[job["id"]]
    assert rc == 0, f"{job['id']} (as run: {job.get('args')}) exited {rc}:\n{output[-3000:]}"
    _evidence(job, output, work)


def test_choices_help(readme_runs):
    rc, output, _ = readme_runs[0]["choices --help"]
    assert rc == 0 and "usage: python -m bertode.choices" in output, output


@pytest.mark.parametrize("name", ["wikitext2_mini_5min", "deq_transformer_wt2_cpu"])
def test_wikitext_recipes_without_files_say_which_files(name, readme_runs):
    rc, output, _ = readme_runs[0][f"{name} without data.files"]
    lines = output.strip().splitlines()
    assert rc == 2 and len(lines) == 1, output
    assert lines[0].startswith("error: data.files=") and "is invalid; allowed:" in lines[0], lines
    assert "data.files='[../shared/data/wikitext-2/valid.txt]'" in lines[0] and "data.eval_files=" in lines[0], lines
