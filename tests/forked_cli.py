"""`python -m ae_lab` many times for the price of one start-up: this process imports ae_lab (torch, Lightning,
Hydra: most of a run's start-up) once, then forks one child per command line, which runs the command-line
entry as `python -m ae_lab ARGS` does, in its own folder, with its own stdout and stderr files; its exit
code is the child's. Each child is a process of its own: Hydra's global state, logging, the working
folder and the environment start fresh from this parent's, which has run nothing.

The conftest fixture `run_cli_many` runs it: the cases, a JSON list of [args, cwd], on stdin; on stdout a
JSON list of exit codes, one per case; each case's output in cwd/forked-cli.stdout and .stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import traceback

STDOUT, STDERR = "forked-cli.stdout", "forked-cli.stderr"


def run_child(args: list[str], cwd: str) -> int:
    """In the forked child: `python -m ae_lab ARGS` in `cwd`; the process's exit code."""
    os.chdir(cwd)
    for fd, name in ((1, STDOUT), (2, STDERR)):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.path[0] = cwd  # as `python -m` has it: the working folder first, not tests/
    sys.argv = ["-m", *args]  # runpy sets argv[0] to the module's file, as `python -m` does
    try:
        runpy.run_module("ae_lab", run_name="__main__", alter_sys=True)  # what `python -m ae_lab` runs
        code = 0
    except SystemExit as stop:  # as the interpreter ends: None is 0, a message is printed and is 1
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught error, as the interpreter reports it
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main() -> None:
    # what a run imports (torch, Lightning, Hydra: most of its start-up), paid once here, before the forks
    for module in ("ae_lab.composition_errors", "ae_lab.hydra_callbacks", "ae_lab.run"):
        importlib.import_module(module)
    codes = []
    for args, cwd in json.load(sys.stdin):
        pid = os.fork()
        if pid == 0:
            os._exit(run_child(args, cwd))
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(codes))


if __name__ == "__main__":
    main()
