"""`python -m hydra_plugins.ae_lab_plugins.group_worker <sweep>/.ensembles/<group>.jobs.pkl`: one ensemble
group of a `hydra/launcher=vectorized` sweep, trained in this process on the one GPU it sees.

The vectorized launcher starts it with CUDA_VISIBLE_DEVICES set to one GPU and its output going to
`<group>.log`; the file holds the group (`vectorized_launcher._Group`: its jobs with their full composed
configs, Hydra node and Hydra's resolver cache included, so that `${now:...}` and the sweep folder
resolve as in the launcher). The members are written exactly as the launcher writes them in-process
(`VectorizedLauncher.members`, `run_group`). Exit code 0 when the group trained (a NaN member is
recorded failed in its run.json), 130 on Ctrl-C (members recorded interrupted, group checkpoint kept),
1 on any other error (the traceback is in the log).
"""

import logging
import os
import pickle
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def main(handover: Path) -> int:
    from hydra.core.utils import configure_log, setup_globals

    from ae_lab.ensemble.group import run_group
    from hydra_plugins.ae_lab_plugins.vectorized_launcher import VectorizedLauncher

    with open(handover, "rb") as file:
        group = pickle.load(file)
    setup_globals()  # Hydra's resolvers (`now`, `hydra:`), as in the launcher's process
    hydra = group.jobs[0].config.hydra
    configure_log(hydra.hydra_logging, hydra.verbose)
    log.info("ensemble %s: worker %d, CUDA_VISIBLE_DEVICES=%s, %d members", group.name, os.getpid(),
             os.environ.get("CUDA_VISIBLE_DEVICES"), len(group.jobs))
    try:
        run_group(VectorizedLauncher.members(group.jobs), group.name, group.checkpoint)
    except KeyboardInterrupt:
        log.error("ensemble %s interrupted: its members are recorded interrupted, its checkpoint %s kept",
                  group.name, group.checkpoint)
        return 130
    handover.unlink(missing_ok=True)
    log.info("ensemble %s: done", group.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
