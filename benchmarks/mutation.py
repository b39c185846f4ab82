"""Mutation testing of the modules that define ae_lab's numbers, and its report benchmarks/MUTATION.md.

    PYTHONPATH=$PWD nice python benchmarks/mutation.py                      # every module below, in order
    PYTHONPATH=$PWD nice python benchmarks/mutation.py objectives noise     # some of them (by short name)
    PYTHONPATH=$PWD nice python benchmarks/mutation.py nets --rerun-survivors  # after adding tests for them
    PYTHONPATH=$PWD python benchmarks/mutation.py --report                  # only rewrite the report

mutmut (3.x) plants one small change at a time in a module (an operator, a constant, a dropped argument)
and runs the tests that call the changed function (it records which tests call which function in a first,
clean run): a mutant is killed when a test fails, survives when all pass. Each module is measured in its
own scratch copy of the checkout (`--work`), against only the tests that cover its numbers (`MODULES`),
on one worker, each run bounded by `--budget` seconds (a module cut short reports its unchecked mutants).
Its outcome goes to benchmarks/mutation/<name>.json, so modules can be measured one at a time and the
report (MUTATION.md) is made from every module measured so far. A survivor judged equivalent (no test
can tell it apart from the original: it changes nothing a caller can observe) is listed with the reason,
from benchmarks/mutation_equivalent.toml, matched by file and by the original and mutated lines.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "mutation"
REPORT = ROOT / "benchmarks" / "MUTATION.md"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.toml"
# the tests of the regimes' numbers (schedules, KL forms), not the ones that train runs from the command line
REGIME_UNITS = [f"tests/test_regimes.py::test_{name}" for name in (
    "linear_warm_up_against_its_closed_form", "cyclical_schedule_against_its_closed_form",
    "constant_schedule_keeps_the_weight_and_capacity_rises_linearly",
    "free_bits_take_the_max_per_unit_and_a_unit_below_them_gets_no_gradient",
    "capacity_loss_is_gamma_times_the_distance_of_the_kl_to_the_capacity",
    "free_bits_loss_by_hand_and_the_true_kl_still_reported",
    "tc_terms_sum_to_the_sampled_kl_and_mss_matches_a_brute_force_aggregate",
    "tc_is_near_zero_for_independent_codes_and_the_gaussian_value_for_duplicated_ones",
    "mws_bias_is_the_documented_constant_when_the_batch_is_the_whole_set", "tc_objective_weights_its_three_terms",
    "tc_terms_of_a_batch_of_one_and_the_default_estimator", "gaussian_log_density_matches_torch_distributions")]
GREEDY_UNITS = [f"tests/test_greedy.py::test_{name}" for name in (
    "each_phase_trains_only_its_layer_and_fine_tuning_starts_from_the_pretrained_weights",
    "each_phase_trains_on_its_layers_error_for_the_corrupted_input_computed_by_hand",
    "a_phase_checkpoint_is_written_at_the_last_epoch_of_its_phase_only")]


@dataclass(frozen=True)
class Module:
    name: str
    path: str
    tests: list[str]  # pytest arguments selecting the tests that cover it
    note: str = ""  # what the report should say about the selection


# in the order of importance (issue 29): a run cut short has measured the first ones
MODULES = [
    Module("objectives", "ae_lab/objectives.py",
           ["tests/test_objectives.py", "tests/test_reference_step.py", *REGIME_UNITS]),
    Module("kl_forms", "ae_lab/kl_forms.py", REGIME_UNITS),
    Module("nets", "ae_lab/nets.py", ["tests/test_nets.py", "tests/test_reference_step.py"]),
    Module("noise", "ae_lab/noise.py", ["tests/test_noise.py"]),
    Module("schedules", "ae_lab/schedules.py", REGIME_UNITS),
    Module("module", "ae_lab/module.py", ["tests/test_reference_step.py", *GREEDY_UNITS],
           note="its selection is the whole-step reference, the optimiser and the greedy phases: the epoch "
                "logging (`_log_epoch`, `on_train_epoch_end`) and the mid-epoch checkpoint sums are checked by "
                "tests that train from the command line (tests/test_regimes.py, tests/test_greedy.py, "
                "tests/test_resume.py), outside it, so their mutants survive or reach no test here; which metric the "
                "progress bar shows (`prog_bar`) no test checks"),
    # its unit tests and the one evaluating a module against references, not the ones that train runs
    Module("evaluation", "ae_lab/evaluation/*.py", [
        "tests/test_evaluation.py", "-k", "not run and not draw and not probe_on_digits and not repeatable "
        "and not held_out"],
           note="its selection is tests/test_evaluation.py's unit tests and the reference test of `evaluate`; the "
                "disentanglement metrics' input checks (most of its survivors) are tested in "
                "tests/test_disentanglement.py, outside it; its survivors are not yet judged (listed as not "
                "equivalent) and most of its 1,491 mutants were not checked"),
    Module("greedy", "ae_lab/greedy.py", GREEDY_UNITS),
    Module("ensemble_optim", "ae_lab/ensemble/optim.py",
           ["tests/test_vectorized.py", "-k", "stacked_optimizer or frozen_member"],
           note="its selection is the optimiser's unit tests against torch.optim; gradient clipping, the lr "
                "milestones' scale and the state kept in a group checkpoint are exercised by "
                "tests/test_vectorized.py's equality and resume tests, outside it; its survivors are not yet "
                "judged (listed as not equivalent; its device= and dtype= ones are of the kind judged "
                "equivalent on the CPU elsewhere)"),
]
STATUS = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
          255: "timeout", 33: "no tests", 5: "no tests", None: "not checked"}


def scratch_copy(module: Module, work: Path) -> Path:
    """A fresh copy of the checkout's code, config and tests for one module, with mutmut's settings."""
    where = work / module.name
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("ae_lab", "conf", "hydra_plugins", "tests"):
        shutil.copytree(ROOT / folder, where / folder, ignore=ignore)
    # the tests find the MNIST files beside the checkout (ROOT.parent / "shared"), and mutmut runs them in
    # where/mutants
    if (ROOT.parent / "shared").exists():
        (where / "shared").symlink_to(ROOT.parent / "shared")
    write_settings(module, where)
    # made now, so that the PYTHONPATH entry naming it is a folder when Python first looks (a missing one
    # stays unimportable for the process's life)
    (where / "mutants").mkdir()
    return where


def write_settings(module: Module, where: Path) -> None:
    """The scratch copy's pyproject.toml: the checkout's, with mutmut's settings for `module`."""
    settings = {"source_paths": ["ae_lab"], "only_mutate": [module.path], "also_copy": ["conf", "hydra_plugins"],
                "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q"],
                "pytest_add_cli_args_test_selection": module.tests, "process_isolation": "forkserver"}
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    # without pytest's addopts (-n auto): mutmut runs the tests in its own process
    pyproject = re.sub(r"^addopts = .*$", "", (ROOT / "pyproject.toml").read_text(), flags=re.M)
    pyproject += "\n[tool.mutmut]\n" + "\n".join(lines) + "\n"
    (where / "pyproject.toml").write_text(pyproject)


def first_line(source: str, qualified: str) -> int:
    """The line where function `qualified` ("f" or "Class.f") starts (its first decorator), 1-based."""
    *owners, name = qualified.split(".")
    body = ast.parse(source).body
    for owner in owners:
        body = next(node.body for node in body if isinstance(node, ast.ClassDef) and node.name == owner)
    node = next(node for node in body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.name == name)
    return min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])


_DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
print(json.dumps({key: get_diff_for_mutant(key) for key in json.load(sys.stdin)}))
"""


def describe(where: Path, keys: list[str]) -> dict[str, dict]:
    """Each mutant's line in the original file and its original and mutated lines, from mutmut's diffs
    (read in one process in the scratch copy: `mutmut show` takes a second or more a mutant)."""
    done = subprocess.run([sys.executable, "-c", _DIFFS], cwd=where, input=json.dumps(keys), capture_output=True,
                          text=True, check=True)
    described = {}
    for key, diff in json.loads(done.stdout).items():
        removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
        added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
        hunk = re.search(r"^@@ -(\d+)", diff, re.M)
        path = re.search(r"^--- (.+)$", diff, re.M)
        # mutmut's names: ae_lab.objectives.x_kl_sparsity__mutmut_3, ae_lab.nets.xǁGaussianHeadǁforward__mutmut_1
        function = key.rsplit("__mutmut_", 1)[0].split(".")[-1]
        function = function.removeprefix("x_").removeprefix("xǁ").replace("ǁ", ".")
        line = None
        if hunk and path and removed:
            body = diff[hunk.end():].splitlines()[1:]
            offset = next(i for i, text in enumerate(body) if text.startswith("-"))
            line = first_line((where / path.group(1)).read_text(), function) + int(hunk.group(1)) - 1 + offset
        described[key] = {"line": line, "original": "\n".join(removed).strip(), "mutant": "\n".join(added).strip()}
    return described


def measure(module: Module, work: Path, budget: float) -> dict:
    """Run mutmut over one module (at most `budget` seconds) and collect every mutant's outcome."""
    where = scratch_copy(module, work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           # the runs a test starts (python -m ae_lab) import the mutated copy too
           "PYTHONPATH": str(where / "mutants")}
    started = time.monotonic()
    with open(where / "mutmut.log", "w") as output:
        try:
            done = subprocess.run(["mutmut", "run", "--max-children", "1"], cwd=where, env=env, stdout=output,
                                  stderr=subprocess.STDOUT, timeout=budget)
            finished = done.returncode == 0
        except subprocess.TimeoutExpired:
            finished = False
    (where / "run.json").write_text(json.dumps({"seconds": round(time.monotonic() - started), "finished": finished}))
    return collect(module, where)


def rerun_survivors(module: Module, work: Path) -> dict:
    """Check an earlier run's survivors (and mutants no test reached) again against the checkout's present
    tests, after tests were added for them, in that run's scratch copy; the other mutants keep their outcome."""
    where = work / module.name
    shutil.rmtree(where / "tests")
    shutil.copytree(ROOT / "tests", where / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # the present test selection, and which tests call which function collected afresh (mutmut keeps the
    # verdicts when it has no earlier settings to compare with)
    write_settings(module, where)
    (where / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    survivors = [mutant["key"] for mutant in collect(module, where)["mutants"]
                 if mutant["status"] in ("survived", "no tests")]
    if survivors:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(where / "mutants")}
        with open(where / "mutmut-rerun.log", "w") as output:
            # the test mapping first, by itself: a `mutmut run` that collects it ran the named mutants with the
            # mapping it had before (mutmut 3.8.1; measured: survivors a second run killed)
            for command in (["print-time-estimates"], ["run", "--max-children", "1"]):
                subprocess.run(["mutmut", *command, *survivors], cwd=where, env=env, stdout=output,
                               stderr=subprocess.STDOUT)
    (where / "rechecked").touch()
    return collect(module, where)


def collect(module: Module, where: Path) -> dict:
    """The outcome of every mutant of a run in scratch copy `where` (its run.json: time and whether it
    finished within the budget)."""
    mutants = []
    for meta in sorted((where / "mutants").glob(module.path + ".meta")):
        source_file = str(meta.relative_to(where / "mutants").with_suffix(""))
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            mutants.append({"key": key, "file": source_file, "status": STATUS.get(code, "suspicious")})
    # the mutants a reader needs to see: all but the killed and the not checked (counted only)
    shown = [mutant["key"] for mutant in mutants if mutant["status"] not in ("killed", "not checked")]
    described = describe(where, shown) if shown else {}
    for mutant in mutants:
        mutant.update(described.get(mutant["key"], {}))
    log = (where / "mutmut.log").read_text() if (where / "mutmut.log").exists() else ""
    return {"module": module.name, "path": module.path, "tests": module.tests,
            **json.loads((where / "run.json").read_text()), "rechecked": (where / "rechecked").exists(),
            "mutants": mutants,
            "log_tail": "" if mutants else log[-1500:]}


def equivalents() -> list[dict]:
    return tomllib.loads(EQUIVALENT.read_text()).get("equivalent", []) if EQUIVALENT.exists() else []


def why_equivalent(mutant: dict, known: list[dict]) -> str | None:
    for entry in known:
        if (entry["file"] == mutant["file"] and entry["original"].strip() == mutant.get("original")
                and entry["mutant"].strip() == mutant.get("mutant")):
            return entry["why"]
    return None


def report() -> str:
    """MUTATION.md from every module's outcome in benchmarks/mutation/."""
    known = equivalents()
    measured = {path.stem: json.loads(path.read_text()) for path in RESULTS.glob("*.json")}
    rows, survivors = [], []
    totals = {"killed": 0, "equivalent": 0, "non-equivalent": 0}
    for module in MODULES:
        result = measured.get(module.name)
        if result is None:
            rows.append(f"| {module.name} | `{module.path}` | not yet measured | | | | | |")
            continue
        counts: dict[str, int] = {}
        equivalent = 0
        for mutant in result["mutants"]:
            counts[mutant["status"]] = counts.get(mutant["status"], 0) + 1
            if mutant["status"] in ("killed", "not checked"):
                continue
            why = why_equivalent(mutant, known)
            equivalent += why is not None and mutant["status"] == "survived"
            survivors.append((module.name, mutant, why))
        live = counts.get("survived", 0) - equivalent
        killed = counts.get("killed", 0) + counts.get("timeout", 0)
        totals["killed"] += killed
        totals["equivalent"] += equivalent
        totals["non-equivalent"] += live
        score = f"{100 * killed / (killed + live):.0f} %" if killed + live else "-"
        rest = sum(count for status, count in counts.items() if status not in ("killed", "survived", "timeout"))
        state = ("" if result["finished"] else " (cut short)") + (", survivors rechecked" if result.get("rechecked")
                                                                 else "")
        rows.append(f"| {module.name} | `{module.path}` | {result['seconds']} s{state} | {counts.get('killed', 0)} | "
                    f"{counts.get('timeout', 0)} | {counts.get('survived', 0)} ({equivalent} equivalent) | {rest} "
                    f"| {score} |")
    overall = totals["killed"] + totals["non-equivalent"]
    lines = [
        "# Mutation testing",
        "",
        "Made by `benchmarks/mutation.py` (mutmut 3; see its docstring and the README's Tests section): each module",
        "mutated in a scratch copy, against the tests named in `MODULES` only, one worker, under `nice`. A timed-",
        "out mutant counts as killed (the mutant made the tests hang or loop). *Other*: not checked (the run's",
        "budget ran out), no test calls the function, or suspicious. Score: killed / (killed + non-equivalent",
        "survivors). Equivalent survivors are judged by hand in `benchmarks/mutation_equivalent.toml`. *Time*:",
        "the module's run, cut short where its budget ran out; *survivors rechecked*: its survivors (and the",
        "mutants no test reached) run again, with `--rerun-survivors`, against the tests added for them since.",
        "",
        "| module | file | time | killed | timeout | survived | other | score |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Over the measured modules: {totals['killed']} killed, {totals['non-equivalent']} non-equivalent survivors, "
        f"{totals['equivalent']} equivalent: "
        + (f"{100 * totals['killed'] / overall:.1f} % of the non-equivalent mutants killed." if overall else "-"),
        "",
        *(f"- {module.name}: {module.note}." for module in MODULES if module.note and module.name in measured),
        *([f"- Not yet measured: {', '.join(module.name for module in MODULES if module.name not in measured)}."]
          if len(measured) < len(MODULES) else []),
        "",
        "## Survivors and mutants not killed",
        "",
    ]
    for name, mutant, why in survivors:
        where = f"{mutant['file']}:{mutant['line']}" if mutant.get("line") else mutant["file"]
        verdict = f"equivalent: {why}" if why else ("**not equivalent**" if mutant["status"] == "survived"
                                                     else mutant["status"])
        change = f"`{mutant.get('original', '?')}` -> `{mutant.get('mutant', '?')}`"
        lines.append(f"- `{where}` ({mutant['status']}) {change}: {verdict}")
    if not survivors:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"short names, of {[module.name for module in MODULES]}")
    parser.add_argument("--budget", type=float, default=1200, help="seconds at most per module (default 1200)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ae_lab_mutation",
                        help="scratch folder for the mutated copies")
    parser.add_argument("--report", action="store_true", help="only rewrite MUTATION.md from the stored outcomes")
    parser.add_argument("--collect", action="store_true",
                        help="read the outcomes of the modules' earlier runs in --work instead of running mutmut")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="check the survivors of the modules' earlier runs in --work against the present tests")
    args = parser.parse_args()
    by_name = {module.name: module for module in MODULES}
    unknown = [name for name in args.modules if name not in by_name]
    if unknown:
        sys.exit(f"unknown module(s) {unknown}: allowed are {list(by_name)}")
    if not args.report:
        RESULTS.mkdir(exist_ok=True)
        for name in args.modules or list(by_name):
            module = by_name[name]
            if args.collect:
                result = collect(module, args.work / name)
            elif args.rerun_survivors:
                result = rerun_survivors(module, args.work)
            else:
                result = measure(module, args.work, args.budget)
            (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
            print(f"{name}: {len(result['mutants'])} mutants in {result['seconds']} s", flush=True)
    REPORT.write_text(report())


if __name__ == "__main__":
    main()
