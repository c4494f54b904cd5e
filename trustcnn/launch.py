"""Sweeps at scale: what each job of a parallel multirun may use, and going on after a requeue.

The engines are Hydra's launcher plugins, used as they are (``pip install -e ".[launchers]"``): joblib
(loky processes on this machine), submitit (its local executor, or SLURM) and Ray (a local instance or a
cluster). ``conf/hydra/launcher/{joblib,submitit_local,submitit_slurm,ray}.yaml`` keep the plugins' option
names and set this project's defaults (one GPU per job, the CPU share, time limits); each holds every key
of its plugin's config. Hydra only instantiates launchers from the ``hydra_plugins`` namespace, which an
editable install of this project cannot add to (hydra#2359), so nothing here subclasses a launcher.

In the job, :func:`job_threads` caps the torch threads and data-loader workers at :func:`job_cpu_share`,
read from the job's own Hydra config: joblib's ``n_jobs``, submitit's ``cpus_per_task``, the CPUs Ray
assigned to the task. :func:`resume_after_requeue` makes a job that SLURM restarted (preempted, or
requeued by submitit at its time limit) go on from its own newest checkpoint (``checkpoints/last.ckpt``,
or the mid-epoch one Lightning's SLURM handler wrote on the requeue signal).

GPUs: Ray (``num_gpus`` per task) and SLURM (``gpus_per_node``) give each job its own GPU(s) and set its
``CUDA_VISIBLE_DEVICES``. Submitit's *local* executor does not: every job gets GPUs ``0..gpus_per_node-1``
and all jobs run at once; on a multi-GPU machine, use Ray.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("trustcnn.launch")

#: The options of ``hydra/launcher`` that conf/hydra/launcher/ provides under the plugins' own names.
LAUNCHER_OPTIONS = ("joblib", "submitit_local", "submitit_slurm", "ray")


def quiet_schema_warning() -> None:
    """Hydra 1.3 still merges a primary-config file onto the plugin's structured config of the same name
    (validating it), and warns on every launch that it will stop. Ours hold every key of the plugin's
    config, so they compose the same once it stops: that warning is silenced for these files only."""
    warnings.filterwarnings(
        "ignore", category=UserWarning,
        message=rf"\s*'hydra/launcher/({'|'.join(LAUNCHER_OPTIONS)})' is validated against ConfigStore schema")


quiet_schema_warning()


def available_cpus() -> int:
    """The cores this process may use: its CPU affinity mask and cgroup quota (joblib's count)."""
    from joblib import cpu_count

    return max(1, int(cpu_count()))


def visible_gpus() -> int:
    """The CUDA GPUs this process can see (``CUDA_VISIBLE_DEVICES`` applies)."""
    import torch

    return torch.cuda.device_count()


def resolve_n_jobs(n_jobs: int | None, cores: int) -> int:
    """joblib's ``n_jobs`` as a count: ``-1`` = all cores, ``-2`` = all but one, ...; ``None`` = 1."""
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    if n_jobs == 0:
        raise ValueError("hydra.launcher.n_jobs=0 runs nothing; use a positive count, or -1 for one job per core.")
    return n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)


# --------------------------------------------------------------------------------------------- the CPU share


def _ray_assigned_cpus() -> float | None:
    """The CPUs Ray assigned to the task running in this process, if this is a Ray worker."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - a driver, not a task: nothing assigned
        return None


def job_cpu_share() -> int | None:
    """How many cores this job may use while other jobs of its sweep run beside it.

    From the job's Hydra config:

    * joblib: the cores divided by ``hydra.launcher.n_jobs`` (what joblib itself sets ``OMP_NUM_THREADS``
      to in its workers);
    * submitit (local, SLURM): ``hydra.launcher.cpus_per_task`` (SLURM also confines the job to that many);
    * Ray: the CPUs Ray assigned to this task (``hydra.launcher.ray.remote.num_cpus``).

    Never more than :func:`available_cpus`. ``None`` when nothing says: a single run, the basic
    (sequential) launcher, an unknown launcher, submitit without ``cpus_per_task``.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    launcher = hc.launcher
    target = str(launcher.get("_target_") or "").lower()
    cores = available_cpus()
    if "joblib" in target:
        return max(1, cores // resolve_n_jobs(launcher.get("n_jobs"), cores))
    if "submitit" in target:
        cpus = launcher.get("cpus_per_task")
        return min(cores, int(cpus)) if cpus else None
    if "ray" in target:
        cpus = _ray_assigned_cpus()
        if cpus is None:
            cpus = OmegaConf.select(launcher, "ray.remote.num_cpus", default=None) or 1  # Ray's default for a task
        return min(cores, max(1, int(cpus)))
    return None


def job_threads(cfg: DictConfig) -> int | None:
    """The torch intra-op threads of this job; caps ``cfg.data.num_workers`` the same way.

    ``num_threads`` (``null`` = all the cores available to this job), at most :func:`job_cpu_share` when
    jobs of a sweep share the machine; ``None`` leaves torch's default (all cores) as it is. The choice is
    logged (``<job dir>/train.log``).
    """
    wanted = cfg.get("num_threads")
    data = cfg.get("data")
    workers = data.get("num_workers") if isinstance(data, DictConfig) else None
    if workers:
        data_workers_can_start()
    share = job_cpu_share()
    if share is None:
        return int(wanted) if wanted else None
    threads = min(int(wanted), share) if wanted else share
    if workers and int(workers) > share:
        with open_dict(data):
            data.num_workers = share
    log.info("torch threads: %d (num_threads=%s; this job's CPU share: %d of %d cores); data workers: %s",
             threads, wanted, share, available_cpus(), workers if not workers or int(workers) <= share else
             f"{share} (data.num_workers={workers})")
    return threads


def data_workers_can_start() -> None:
    """In a joblib (loky) worker, use the platform's multiprocessing start method again.

    Loky makes its own start method the process default in its workers, and that one cannot start a
    plain ``multiprocessing.Process``: a DataLoader with workers fails there ("'Process' object has no
    attribute 'env'"). The worker runs one job at a time and starts no loky processes itself.
    """
    method = multiprocessing.get_start_method(allow_none=True)
    if method and method.startswith("loky"):
        multiprocessing.set_start_method(None, force=True)


def ray_cpus_per_job(address: str | None = None, num_gpus: float | None = 0) -> int:
    """``${trustcnn.ray_cpus_per_job:<ray.init.address>,<num_gpus>}``: the default ``num_cpus`` of a Ray job.

    On a local instance (no address, no ``RAY_ADDRESS``) with ``num_gpus`` > 0: this machine's cores
    divided by the jobs its GPUs hold at once. Fails if it has fewer GPUs than one job asks for (Ray would
    wait for them forever). Without GPUs, or on a cluster: 1 (Ray's default; set your nodes' cores per GPU).
    """
    if address or os.environ.get("RAY_ADDRESS") or not num_gpus:
        return 1
    gpus = visible_gpus()
    if gpus < float(num_gpus):
        raise ValueError(f"hydra.launcher.ray.remote.num_gpus={float(num_gpus):g} per job, but this machine has {gpus} "
                         "visible GPU(s), so Ray would wait forever. Set hydra.launcher.ray.remote.num_gpus=0 to run "
                         "on the CPUs, or hydra.launcher.ray.init.address=<head>:6379 to use a cluster.")
    return max(1, available_cpus() // max(1, int(gpus // float(num_gpus))))


OmegaConf.register_new_resolver("trustcnn.ray_cpus_per_job", ray_cpus_per_job, replace=True)


# ------------------------------------------------------------------------------------- resume after requeue


def _resumed_from(config_file: Path) -> str | None:
    """The ``ckpt_path`` a run's ``config.yaml`` records."""
    try:
        value = OmegaConf.load(config_file).get("ckpt_path")
    except Exception:  # noqa: BLE001 - unreadable: as if none
        return None
    return None if value is None else str(value)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest of a run's ``checkpoints/last.ckpt`` (end of its latest epoch) and the mid-epoch
    ``hpc_ckpt_<n>.ckpt`` files that Lightning's SLURM handler writes into the run directory (its
    ``default_root_dir``) when the job gets the requeue signal (``SIGUSR1``); ``None`` if it has neither."""
    found = [p for p in [output_dir / "checkpoints" / "last.ckpt", *output_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def resume_after_requeue(cfg: DictConfig) -> Path | None:
    """Go on from this job's own latest checkpoint when SLURM restarted the job.

    SLURM sets ``SLURM_RESTART_COUNT`` (> 0) in a job it requeued: preempted, requeued by submitit at its
    time limit, or by Lightning's handler of the requeue signal. The same job runs again in the same job
    directory (same sweep directory and job number), so its newest checkpoint (:func:`latest_checkpoint`:
    ``last.ckpt``, or the mid-epoch ``hpc_ckpt_<n>.ckpt`` the signal handler wrote; Lightning writes both
    atomically) is where to go on. Then ``cfg.ckpt_path`` is set to it (any other ``ckpt_path`` was the
    starting point of the first attempt, which that checkpoint already continues) and the file returned.
    Otherwise nothing changes: a first attempt, no SLURM, no checkpoint yet, or one older than the
    directory's ``config.yaml`` (written when the previous attempt started) that the previous attempt did
    not resume from either: an earlier run's, in a reused directory.
    """
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    output_dir = Path(cfg.paths.output_dir)
    last, started = latest_checkpoint(output_dir), output_dir / "config.yaml"
    if last is None:
        log.warning("SLURM restarted this job (SLURM_RESTART_COUNT=%s) before it saved a checkpoint: starting over.",
                    os.environ["SLURM_RESTART_COUNT"])
        return None
    if started.is_file() and last.stat().st_mtime < started.stat().st_mtime and _resumed_from(started) != str(last):
        log.warning("SLURM restarted this job, but %s is older than %s (an earlier run's, in a reused directory): "
                    "starting over.", last, started)
        return None
    with open_dict(cfg):
        cfg.ckpt_path = str(last)
    log.warning("SLURM restarted this job (SLURM_RESTART_COUNT=%s): resuming from %s",
                os.environ["SLURM_RESTART_COUNT"], last)
    return last


__all__ = ["LAUNCHER_OPTIONS", "available_cpus", "data_workers_can_start", "job_cpu_share", "job_threads",
           "latest_checkpoint", "quiet_schema_warning", "ray_cpus_per_job", "resolve_n_jobs", "resume_after_requeue", "visible_gpus"]
