"""Mutation testing of the modules that define ae_lab's numbers, and its report benchmarks/MUTATION.md.

    PYTHONPATH=$PWD nice python benchmarks/mutation.py                      # every module below, in order
    PYTHONPATH=$PWD nice python benchmarks/mutation.py objectives noise     # some of them (by short name)
    PYTHONPATH=$PWD nice python benchmarks/mutation.py nets --rerun-survivors  # after adding tests for them
    PYTHONPATH=$PWD nice python benchmarks/mutation.py nets --resume        # go on where a budget cut it short
    PYTHONPATH=$PWD python benchmarks/mutation.py --report                  # only rewrite the report

Budget: each module's run stops after `--budget` wall-clock seconds (default 1200, 20 minutes; every
process it started is stopped with it) and records what it checked, so a module is measured in several
bounded runs (`--resume`); one module at a time, on one worker, so it takes one of the machine's cores.
On the shared 2-core machine a module's clean run (its selected tests once, with mutmut's tracing) takes
10-60 s and a mutant 1-5 s: 300 mutants are 5 to 25 minutes.

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
import signal
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
    "tc_terms_sum_to_the_sampled_kl_and_match_a_brute_force_aggregate",
    "stratified_estimates_of_the_aggregate_posterior_are_unbiased_over_every_batch",
    "each_estimators_weight_matrix_is_the_one_its_definition_gives",
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
    paths: tuple[str, ...]  # the files mutated (glob patterns from the checkout's root)
    tests: list[str]  # pytest arguments selecting the tests that cover it
    note: str = ""  # what the report should say about the selection


# in the order of importance (issue 29): a run cut short has measured the first ones
MODULES = [
    Module("objectives", ("ae_lab/objectives.py",),
           ["tests/test_objectives.py", "tests/test_reference_step.py", *REGIME_UNITS, "tests/test_epoch_metrics.py"]),
    Module("kl_forms", ("ae_lab/kl_forms.py",), REGIME_UNITS),
    Module("nets", ("ae_lab/nets.py",), ["tests/test_nets.py", "tests/test_reference_step.py"]),
    Module("noise", ("ae_lab/noise.py",), ["tests/test_noise.py"]),
    Module("schedules", ("ae_lab/schedules.py",), REGIME_UNITS),
    Module("module", ("ae_lab/module.py",),
           ["tests/test_reference_step.py", *GREEDY_UNITS, "tests/test_epoch_metrics.py"],
           note="its selection is the whole-step reference, the optimiser, the greedy phases and the epoch metrics "
                "trained in process (tests/test_epoch_metrics.py); the tests that train from the command line "
                "(tests/test_regimes.py, tests/test_resume.py) cannot count: mutmut maps tests to the functions "
                "they call in its own process, not in the runs they start"),
    # the files that define the evaluation's numbers; its figures (visual.py), the Fréchet distance's
    # feature classifier (classifier.py, sample_quality.py) and the disentanglement metrics (their tests
    # take about 25 s a mutant) are outside this selection
    Module("evaluation", tuple(f"ae_lab/evaluation/{name}.py" for name in (
        "reconstruction", "codes", "likelihood", "anomaly", "downstream", "frechet", "evaluate")), [
        "tests/test_evaluation.py", "tests/test_evaluation_references.py", "tests/test_samplers.py", "-k",
        "not run and not draw and not probe_on_digits and not repeatable and not held_out "
        "and (not test_samplers or frechet_distance_of)"],
           note="its files are the definitions of the evaluation's numbers (the figures, the Fréchet distance's "
                "feature classifier and the disentanglement metrics are not measured); its selection is "
                "tests/test_evaluation.py's unit tests and reference tests of `evaluate`, "
                "tests/test_evaluation_references.py and tests/test_samplers.py's Fréchet distance tests"),
    Module("greedy", ("ae_lab/greedy.py",), GREEDY_UNITS),
    Module("ensemble_optim", ("ae_lab/ensemble/optim.py",),
           ["tests/test_vectorized.py", "tests/test_stacked_optimizer.py", "-k", "stacked_optimizer or frozen_member"],
           note="its selection is the optimiser's and the clipping's unit tests against torch.optim and "
                "torch.nn.utils (tests/test_stacked_optimizer.py, tests/test_vectorized.py's)"),
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
    settings = {"source_paths": ["ae_lab"], "only_mutate": list(module.paths), "also_copy": ["conf", "hydra_plugins"],
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
    started = time.monotonic()
    with open(where / "mutmut.log", "w") as output:
        finished, cpu = run_mutmut(["run", "--max-children", "1"], where, output, budget)
    (where / "run.json").write_text(json.dumps({"seconds": round(time.monotonic() - started), "finished": finished,
                                                "cpu_seconds": round(cpu)}))
    return collect(module, where)


def mutmut_env(where: Path) -> dict[str, str]:
    # one thread; the runs a test starts (python -m ae_lab) import the mutated copy too
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(where / "mutants")}


def run_mutmut(arguments: list[str], where: Path, output, budget: float) -> tuple[bool, float]:
    """`mutmut ARGUMENTS` in scratch copy `where`, stopped (with every process it started: its own session)
    after `budget` seconds; whether it finished, and the CPU seconds it and its processes used."""
    before = os.times()
    process = subprocess.Popen(["mutmut", *arguments], cwd=where, env=mutmut_env(where), stdout=output,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        finished, stopped = process.wait(timeout=budget) == 0, 0.0
    except subprocess.TimeoutExpired:
        # the processes killed with mutmut are not reaped by it, so their CPU time is read before
        stopped = session_cpu_seconds(process.pid) - process_cpu_seconds(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        finished = False
    after = os.times()
    return finished, (after.children_user - before.children_user + after.children_system - before.children_system
                      + stopped)


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of process `pid` and of its children it has waited for (Linux's /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def session_cpu_seconds(session: int) -> float:
    """CPU seconds of the live processes of session `session` (and of their waited-for children)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == session:  # field 6 of stat, the session id
            total += process_cpu_seconds(int(stat.parent.name))
    return total


def rerun(module: Module, work: Path, statuses: tuple[str, ...], budget: float) -> dict:
    """Run again, against the checkout's present tests and selection, the mutants of an earlier run (in its
    scratch copy) whose outcome is in `statuses`: its survivors (and mutants no test reached) after tests
    were added for them, or also those a run cut short left unchecked (`--resume`); the others keep their
    outcome. Refused if the module's code changed since that run (its mutants would be stale)."""
    where = work / module.name
    changed = [path for path in module_files(module, ROOT)
               if not (where / path).exists() or (where / path).read_bytes() != (ROOT / path).read_bytes()]
    if changed or len(module_files(module, where)) != len(module_files(module, ROOT)):
        sys.exit(f"{module.name}: its code changed since the run in {where} ({changed or 'files added or removed'}):"
                 f" measure it afresh (without --resume or --rerun-survivors)")
    refresh_copy(module, where)
    # the present test selection, and which tests call which function collected afresh (mutmut keeps the
    # verdicts when it has no earlier settings to compare with)
    write_settings(module, where)
    (where / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    # the survivors first: a budget that runs out leaves unchecked mutants, not unrechecked survivors
    mutants = collect(module, where)["mutants"]
    again = [mutant["key"] for status in statuses for mutant in mutants if mutant["status"] == status]
    started, cpu, finished = time.monotonic(), 0.0, True
    if again:
        with open(where / "mutmut-rerun.log", "a") as output:
            # the test mapping first, by itself: a `mutmut run` that collects it ran the named mutants with the
            # mapping it had before (mutmut 3.8.1; measured: survivors a second run killed)
            for command in (["print-time-estimates"], ["run", "--max-children", "1"]):
                left = budget - (time.monotonic() - started)
                done, used = run_mutmut([*command, *again], where, output, max(left, 1))
                cpu += used
                finished = finished and done
    run = json.loads((where / "run.json").read_text())
    run["seconds"] += round(time.monotonic() - started)
    run["cpu_seconds"] = run.get("cpu_seconds", 0) + round(cpu)
    # a resumed run has finished once no mutant is left unchecked
    run["finished"] = run["finished"] or ("not checked" in statuses and finished)
    (where / "run.json").write_text(json.dumps(run))
    (where / "rechecked").touch()
    return collect(module, where)


def refresh_copy(module: Module, where: Path) -> None:
    """The checkout's present code, config and tests in scratch copy `where`, but for the mutated files, which
    keep their time stamps (a newer one makes mutmut generate their mutants again, forgetting the outcomes)."""
    kept = where / "kept"
    shutil.rmtree(kept, ignore_errors=True)
    for path in module_files(module, where):
        (kept / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(where / path, kept / path)
    for folder in ("ae_lab", "conf", "hydra_plugins", "tests"):
        shutil.rmtree(where / folder)
        shutil.copytree(ROOT / folder, where / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in module_files(module, kept):
        shutil.copy2(kept / path, where / path)
    shutil.rmtree(kept)


def module_files(module: Module, where: Path) -> list[str]:
    return sorted(str(path.relative_to(where)) for pattern in module.paths for path in where.glob(pattern))


def collect(module: Module, where: Path) -> dict:
    """The outcome of every mutant of a run in scratch copy `where` (its run.json: time and whether it
    finished within the budget)."""
    mutants = []
    for meta in sorted(meta for pattern in module.paths for meta in (where / "mutants").glob(pattern + ".meta")):
        source_file = str(meta.relative_to(where / "mutants").with_suffix(""))
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            mutants.append({"key": key, "file": source_file, "status": STATUS.get(code, "suspicious")})
    # the mutants a reader needs to see: all but the killed and the not checked (counted only)
    shown = [mutant["key"] for mutant in mutants if mutant["status"] not in ("killed", "not checked")]
    described = describe(where, shown) if shown else {}
    for mutant in mutants:
        mutant.update(described.get(mutant["key"], {}))
    log = (where / "mutmut.log").read_text() if (where / "mutmut.log").exists() else ""
    return {"module": module.name, "paths": list(module.paths), "tests": module.tests,
            **json.loads((where / "run.json").read_text()), "rechecked": (where / "rechecked").exists(),
            "mutants": mutants,
            "log_tail": "" if mutants else log[-1500:]}


def files(module: Module) -> str:
    return ", ".join(f"`{path}`" for path in module.paths)


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
    totals = {"killed": 0, "equivalent": 0, "not killed": 0, "not checked": 0, "cpu": 0}
    for module in MODULES:
        result = measured.get(module.name)
        if result is None:
            rows.append(f"| {module.name} | {files(module)} | not yet measured | | | | | | | |")
            continue
        counts: dict[str, int] = {}
        equivalent = 0
        for mutant in result["mutants"]:
            counts[mutant["status"]] = counts.get(mutant["status"], 0) + 1
            if mutant["status"] in ("killed", "timeout", "not checked"):
                continue
            why = why_equivalent(mutant, known)
            equivalent += why is not None
            survivors.append((module.name, mutant, why))
        killed = counts.get("killed", 0) + counts.get("timeout", 0)
        # a survivor, a mutant no test reaches and a suspicious one are not killed, unless judged equivalent
        live = sum(count for status, count in counts.items()
                   if status not in ("killed", "timeout", "not checked")) - equivalent
        totals["killed"] += killed
        totals["equivalent"] += equivalent
        totals["not killed"] += live
        totals["not checked"] += counts.get("not checked", 0)
        totals["cpu"] += result.get("cpu_seconds", 0)
        score = f"{100 * killed / (killed + live):.0f} %" if killed + live else "-"
        state = ("" if result["finished"] else " (cut short)") + (", rechecked" if result.get("rechecked") else "")
        cpu = f"{result['cpu_seconds']} s" if "cpu_seconds" in result else "-"
        rows.append(f"| {module.name} | {files(module)} | {result['seconds']} s{state} | {cpu} | "
                    f"{counts.get('killed', 0)} | {counts.get('timeout', 0)} | {counts.get('survived', 0)} | "
                    f"{counts.get('no tests', 0) + counts.get('suspicious', 0)} | {equivalent} | "
                    f"{counts.get('not checked', 0)} | {score} |")
    overall = totals["killed"] + totals["not killed"]
    lines = [
        "# Mutation testing",
        "",
        "Made by `benchmarks/mutation.py` (mutmut 3; see its docstring and docs/contributing.md): each module",
        "mutated in a scratch copy, against the tests named in `MODULES` only, one worker, under `nice`. A timed-",
        "out mutant counts as killed (the mutant made the tests hang or loop). *No tests*: no selected test calls",
        "the mutated function in the test process (or mutmut found the outcome suspicious); these count as not",
        "killed. *Equivalent*: survivors and untested mutants judged by hand, with the reason, in",
        "`benchmarks/mutation_equivalent.toml`. Score: killed / (killed + the survivors and untested mutants not",
        "judged equivalent). *Not checked*: left when the run's budget ran out (not in the score). *Time*: the",
        "module's runs in wall-clock seconds on the shared 2-core machine, cut short where a budget ran out;",
        "*rechecked*: its survivors (and, with `--resume`, its unchecked mutants) run again against the present",
        "tests. *CPU*: the CPU seconds of those runs (recorded from this round on; `-` for older runs).",
        "",
        "| module | files | time | CPU | killed | timeout | survived | no tests | equivalent | not checked | score |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Over the measured modules: {totals['killed']} killed, {totals['not killed']} not killed and not "
        f"equivalent, {totals['equivalent']} equivalent, {totals['not checked']} not checked: "
        + (f"{100 * totals['killed'] / overall:.1f} % of the non-equivalent mutants killed" if overall else "-")
        + f"; {totals['cpu']} CPU seconds recorded.",
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
    parser.add_argument("--resume", action="store_true",
                        help="as --rerun-survivors, and also the mutants a run cut short left unchecked")
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
            elif args.rerun_survivors or args.resume:
                statuses = ("survived", "no tests") + (("not checked",) if args.resume else ())
                result = rerun(module, args.work, statuses, args.budget)
            else:
                result = measure(module, args.work, args.budget)
            (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
            print(f"{name}: {len(result['mutants'])} mutants in {result['seconds']} s", flush=True)
    REPORT.write_text(report())


if __name__ == "__main__":
    main()
