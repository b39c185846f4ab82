"""The figures of docs/cluster-ensembles.md's scale section, measured on this machine.

    python benchmarks/cluster_scale.py compose [--jobs 1000]
    python benchmarks/cluster_scale.py member --preset mnist_vae|conv_beta_vae --members M

`compose`: what the vectorized launcher does per job before any training, timed (wall clock, and this
process's CPU time for the composition) over `--jobs` jobs of a β × seed sweep: Hydra's
`load_sweep_config` (the sweep's config for one job, as the launcher composes it), the task config
without its `hydra` node (`Job.task_config`), the resolved plain dict the grouping reads, and
`group_jobs` over all of them; the memory the launcher holds for the composed jobs (the growth of its
resident set). `member`: the peak resident memory of a process that builds a group of M members and
trains 3 steps (and validates one batch), above what it held with the data loaded (its resident set
sampled every millisecond), to be differenced between two M for the memory per member.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {  # the MNIST VAE of pythae's benchmark, and Locatello et al.'s conv β-VAE (shapes: dSprites' grid)
    "mnist_vae": ["experiment=pythae_vae_mnist", f"dataset.root={ROOT.parent / 'shared' / 'data'}"],
    "conv_beta_vae": ["experiment=locatello_beta_vae", "loss.beta=4", "dataset.subsample=2000"],
}


def _resident_bytes() -> int:
    """This process's resident set now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def compose(jobs: int) -> dict[str, float]:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from ae_lab.config import register_configs
    from ae_lab.ensemble.grouping import group_jobs
    from hydra_plugins.ae_lab_plugins.gpu_queue import Job

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", ["model=vae", "hydra.sweep.dir=/tmp/scale"], RunMode.MULTIRUN)
        resident = _resident_bytes()
        started, started_cpu = time.perf_counter(), time.process_time()
        configs = [loader.load_sweep_config(master, [f"loss.beta={1 + i % 10}", f"seed={i // 10}"])
                   for i in range(jobs)]
        composed, composed_cpu = time.perf_counter(), time.process_time()
        tasks = [Job(i, [], config, Path("/tmp"), 1).task_config for i, config in enumerate(configs)]
        masked = time.perf_counter()
        plain = [OmegaConf.to_container(task, resolve=True, enum_to_str=True) for task in tasks]
        resolved = time.perf_counter()
        held = _resident_bytes() - resident
        groups = group_jobs(plain, 64)
        grouped = time.perf_counter()
    return {"jobs": jobs, "compose_ms_per_job": 1000 * (composed - started) / jobs,
            "compose_cpu_ms_per_job": 1000 * (composed_cpu - started_cpu) / jobs,
            "task_config_ms_per_job": 1000 * (masked - composed) / jobs,
            "plain_ms_per_job": 1000 * (resolved - masked) / jobs,
            "group_jobs_s": grouped - resolved, "groups": len(groups),
            "held_mib_per_1000_jobs": held / 2**20 * 1000 / jobs}


def member(preset: str, members: int) -> dict[str, float]:
    import torch

    from ae_lab.config import register_configs
    from ae_lab.data import build_datamodule
    from ae_lab.ensemble.group import GroupTrainer, Member
    from hydra import compose as hydra_compose, initialize_config_dir

    torch.set_num_threads(1)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        configs = [hydra_compose(config_name="config", overrides=[
            *PRESETS[preset], f"seed={seed}", "trainer.max_steps=3", "trainer.limit_val_batches=1",
            "trainer.max_epochs=1", "logger=none"]) for seed in range(members)]
    data = build_datamodule(configs[0].dataset)
    before = _resident_bytes()
    peak = [before]
    training = threading.Event()

    def sample() -> None:  # the resident set's high-water mark while the group is built and trains
        while not training.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with tempfile.TemporaryDirectory() as folder:
        group = [Member(config, Path(folder) / str(i)) for i, config in enumerate(configs)]
        trainer = GroupTrainer(group, data, Path(folder) / "group.pt", torch.device("cpu"))
        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
    training.set()
    sampler.join()
    return {"preset": preset, "members": members, "parameters_per_member": trainer.ensemble.flat.shape[1],
            "batch_size": configs[0].dataset.batch_size, "rss_growth_mib": (peak[0] - before) / 2**20,
            "fit_seconds_3_steps": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("compose", "member"))
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mnist_vae")
    parser.add_argument("--members", type=int, default=1)
    arguments = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    result = compose(arguments.jobs) if arguments.what == "compose" else member(arguments.preset, arguments.members)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
