"""`python -m hydra_plugins.ae_lab_plugins.group_worker <sweep>/.ensembles/<group>.jobs.pkl`: one ensemble
group of a `hydra/launcher=vectorized` sweep, trained in this process on the one GPU it sees.

The vectorized launcher starts it with CUDA_VISIBLE_DEVICES set to one GPU and its output going to
`<group>.log`; the file holds the group (`vectorized_launcher._Group`: its jobs with their full composed
configs, Hydra node and Hydra's resolver cache included, so that `${now:...}` and the sweep folder
resolve as in the launcher). The members are written exactly as the launcher writes them in-process
(`VectorizedLauncher.members`, `run_group`). Exit code 0 when the group trained (a NaN member is
recorded failed in its run.json), 130 on Ctrl-C (members recorded interrupted, group checkpoint kept),
1 on any other error (the traceback is in the log).

Under `hydra.launcher.backend=slurm` the group is a SLURM job instead: submitit runs `GroupJob` (the
same `main`) on a node, and requeues it on SLURM's signal once the group has checkpointed
(ae_lab.preemption.ClusterSignal, the hook in ae_lab.ensemble.group.GroupTrainer).
"""

import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


def main(handover: Path, cluster_signal: Optional[Any] = None) -> int:
    """Train the group handed over in `handover`; the exit code (see the module's docstring). With
    `cluster_signal` (ae_lab.preemption.ClusterSignal, taken over), the cluster's signal checkpoints the
    group and requeues the job (this process then ends in submitit's handler)."""
    from hydra.core.utils import configure_log, setup_globals

    from ae_lab.config import register_resolvers
    from ae_lab.ensemble.group import run_group
    from ae_lab.preemption import Requeued
    from hydra_plugins.ae_lab_plugins.vectorized_launcher import VectorizedLauncher

    with open(handover, "rb") as file:
        group = pickle.load(file)
    setup_globals()  # Hydra's resolvers (`now`, `hydra:`), as in the launcher's process
    register_resolvers()  # and ae_lab's (a noise sweep's `${noise_level:...}`)
    hydra = group.jobs[0].config.hydra
    configure_log(hydra.hydra_logging, hydra.verbose)
    log.info("ensemble %s: worker %d, CUDA_VISIBLE_DEVICES=%s, %d members", group.name, os.getpid(),
             os.environ.get("CUDA_VISIBLE_DEVICES"), len(group.jobs))
    try:
        run_group(VectorizedLauncher.members(group.jobs), group.name, group.checkpoint, cluster_signal)
    except Requeued as stop:  # the members are recorded requeued; submitit requeues the job and exits
        log.warning("ensemble %s: %s", group.name, stop)
        stop.requeue()
    except KeyboardInterrupt:
        log.error("ensemble %s interrupted: its members are recorded interrupted, its checkpoint %s kept",
                  group.name, group.checkpoint)
        return 130
    handover.unlink(missing_ok=True)
    log.info("ensemble %s: done", group.name)
    return 0


class GroupJob:
    """What submitit runs as a group's SLURM job: `main` on the group handed over in `handover`, the
    cluster's signal taken over meanwhile. `continued_by`: the sweep's command, recorded in the members
    should the job not be requeued. submitit calls `checkpoint` on the signal (this is
    `submitit.helpers.Checkpointable`'s protocol, without importing submitit at Hydra's start-up): the
    requeued job runs this same object again, which resumes from the group checkpoint."""

    def __init__(self, handover: Path, continued_by: str) -> None:
        self.handover = handover
        self.continued_by = continued_by

    def __call__(self) -> None:
        from ae_lab.preemption import ClusterSignal

        with ClusterSignal(self.continued_by).taken_over() as cluster_signal:
            code = main(self.handover, cluster_signal)
        if code != 0:
            raise RuntimeError(f"the ensemble group ended with exit code {code}")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
