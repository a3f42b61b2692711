"""docs/testing.md's kill-rate table against the mutation runs' own records (issue 29).

``scripts/mutation.py`` writes ``results/mutation/<module>.json`` (mutmut's counts and every survivor's
diff); the table in docs/testing.md is what a reader sees. This keeps the two equal: every results file has
its row and every row its file, with the same mutants, killed (timeouts count as killed) and survivors; the
non-equivalent rate is killed / (mutants - equivalent) as printed; and every module meets the issue's
targets (>= 90 % of non-equivalent mutants killed in the numerics and layer code, >= 80 % in training/).

A run stopped before every mutant was tested is a partial record (``not_checked`` > 0, with a ``note``): its
row says ``N (n run)`` and ``% of those run``, and it is reported as xfail until a whole run replaces it. A
whole run below its target is listed in ``BELOW_TARGET`` with the reason, and is xfail only while it is
below (once it meets the target, the entry must go).
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (bertode/\S+\.py) \| (\d+)(?: \((\d+) run\))? \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) %"
                 r"( of those run)? \|")
# whole runs below the issue's target (docs/testing.md says which mutants are left and why)
BELOW_TARGET: dict[str, str] = {}  # none now (loop.py left it on 2026-12-06 at 99.4 %)


def _table() -> dict:
    rows = {}
    for line in (ROOT / "docs" / "testing.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            module, mutants, run, killed, survivors, equivalent, rate, partial = match.groups()
            assert module not in rows, f"{module} has two rows in docs/testing.md"
            assert (run is None) == (partial is None), f"{module}: a partial row says '(n run)' and 'of those run'"
            rows[module] = (int(mutants), None if run is None else int(run), int(killed), int(survivors),
                            int(equivalent), float(rate))
    return rows


def _records() -> dict:
    records = {}
    for path in sorted((ROOT / "results" / "mutation").glob("*.json")):
        record = json.loads(path.read_text())
        assert path.stem == record["module"][len("bertode/"):-len(".py")].replace("/", "."), path
        records[record["module"]] = record
    return records


def test_every_results_file_has_its_row_and_every_row_its_file():
    table, records = _table(), _records()
    assert len(records) >= 30  # the runs of issue 29 are committed
    assert sorted(table) == sorted(records)


@pytest.mark.parametrize("module", sorted(_records()))
def test_the_row_is_the_run_and_meets_the_issue_target(module):
    mutants, run, killed, survivors, equivalent, rate = _table()[module]
    record = _records()[module]
    assert mutants == record["mutants"]
    tested = mutants - record["not_checked"]
    assert run == (tested if record["not_checked"] else None), f"{module}: the row's run count is not the record's"
    assert killed == record["killed"] + record["timeout"]
    assert survivors == tested - killed
    # a whole run lists every survivor's diff; an interrupted re-test can lose some names (its note says so)
    assert len(record["survivors"]) == survivors if not record["not_checked"] else len(record["survivors"]) <= survivors
    assert 0 <= equivalent <= survivors
    assert rate == round(100 * killed / (tested - equivalent), 1)
    target = 80 if module.startswith("bertode/training/") else 90
    if record["not_checked"]:
        pytest.xfail(f"{module}: partial run, {record['not_checked']} of {mutants} mutants not tested ({record['note']})")
    if module in BELOW_TARGET:
        assert rate < target, f"{module} now meets its target ({rate} %): remove it from BELOW_TARGET"
        pytest.xfail(f"{module}: {rate} % < {target} %: {BELOW_TARGET[module]}")
    assert rate >= target, f"{module}: {rate} % is below the target {target} %"


def test_every_default_selection_names_modules_and_tests_that_exist(capsys):
    """A renamed test or module would leave `scripts/mutation.py --all` running a selection that tests nothing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" / "mutation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for module, tests in [*script.TESTS_BY_MODULE.items(), *script.PROCESS_TESTS.items()]:
        assert (ROOT / module).is_file(), module
        for test in tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).is_file(), (module, test)
            if name:
                assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", (ROOT / path).read_text(), re.M), (module, test)
    for argv, message in ((["--all", "--again"], "--all with --again is invalid; allowed with --all: --jobs, --keep"),
                          ([], "module is missing; allowed: a file bertode/**/*.py of this repository, or --all"),
                          (["bertode/training/evaluate.py", "--processes", "x"],
                           "--processes is invalid for module='bertode/training/evaluate.py': it has no PROCESS_TESTS; "
                           "allowed: bertode/training/loop.py"),
                          (["bertode/training/loop.py", "--processes", "x", "--again"],
                           "--processes with --again or --tests is invalid; allowed: --processes alone (with --scratch, "
                           "--out)")):
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_a_re_run_keeps_the_recorded_results_of_the_mutants_it_did_not_run(tmp_path):
    """mutmut 3 marks every mutant it was not asked to run "not checked" (None): `--again` puts back what was
    recorded for them, and keeps what the re-run found for the others."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" / "mutation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    meta = tmp_path / "mutants" / "bertode" / "m.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": {"m.x_f__mutmut_1": None, "m.x_f__mutmut_2": 1,
                                                     "m.x_f__mutmut_3": 0}, "durations_by_key": {}}))
    script.kept_codes(tmp_path, "bertode/m.py", {"m.x_f__mutmut_1": 1, "m.x_f__mutmut_2": 0, "m.x_f__mutmut_3": 0})
    record = json.loads(meta.read_text())
    assert record["exit_code_by_key"] == {"m.x_f__mutmut_1": 1, "m.x_f__mutmut_2": 1, "m.x_f__mutmut_3": 0}
    assert record["durations_by_key"] == {}
