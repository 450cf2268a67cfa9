"""A plan's runs as cluster jobs (`launcher.kind: submitit`): SLURM, or `cluster: local` on this machine.

Every run that is not complete becomes a job of `nodes x tasks_per_node` processes, each running the recipe
(`ssl_vit.cluster.RunTask`) with torch.distributed's variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT: what torchrun sets, so Accelerate forms one process group over the job). Runs that do not depend
on each other are submitted together; a run is submitted once every run it needs is done, and is blocked when
one failed.

The run folders' `compare_run.json` markers say what became of each job, written by the job itself when it
ends, so that a rerun of the same command
- collects the runs whose jobs finished while no invocation was watching (complete: not run again),
- waits for the jobs of an earlier invocation that are still queued or running (not submitted twice),
- resubmits the runs whose jobs failed, hit their time limit or vanished (pretraining resumes from
  `checkpoint-last` through `train.resume=auto`).
Stopping the tool (Ctrl-C) leaves submitted jobs running; rerunning it picks them up.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ssl_vit.cluster import RunTask
from ssl_vit.compare.plan import LauncherConfig, Run
from ssl_vit.compare.runner import RunStatus, _set_aside, _tail, _write_marker, decide, outputs_exist, read_marker
from ssl_vit.config import ConfigError

__all__ = ["execute_jobs", "make_executor"]

# SLURM states of a job that is still queued or running (anything else has ended).
_LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
         "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}


def make_executor(launcher: LauncherConfig, folder: Path) -> Any:
    """A submitit executor with the plan's resources (the submitit extra must be installed)."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "launcher.kind: submitit needs the submitit package: pip install -e \".[submitit]\" (or pip install "
            "submitit)."
        ) from None
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=launcher.cluster)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"launcher.cluster: {launcher.cluster} cannot submit from this machine ({err}); use cluster: local to "
            f"run the plan's jobs here."
        ) from None
    tasks = launcher.tasks_per_node or max(launcher.gpus_per_node, 1)
    params: dict[str, Any] = dict(timeout_min=launcher.timeout_min, nodes=launcher.nodes, tasks_per_node=tasks,
                                  gpus_per_node=launcher.gpus_per_node, slurm_setup=list(launcher.setup),
                                  local_setup=list(launcher.setup))
    if launcher.cpus_per_task is not None:
        params["cpus_per_task"] = launcher.cpus_per_task
    if launcher.mem_gb is not None:
        params["mem_gb"] = launcher.mem_gb
    if launcher.partition is not None:
        params["slurm_partition"] = launcher.partition
    if launcher.slurm_args:
        params["slurm_additional_parameters"] = dict(launcher.slurm_args)
    executor.update_parameters(**params)
    return executor


@dataclass
class _Active:
    """A run whose job is queued or running: submitted now, or found still alive from an earlier invocation."""

    run: Run
    job: Any
    log: Path
    start: float
    attached: bool = False  # a job of an earlier invocation (no process handle for local jobs)

    def finished(self, cluster: str) -> bool:
        if self.attached and cluster == "local":  # a local job is a process of this machine: its pid
            return self.job.paths.result_pickle.exists() or not _pid_alive(int(self.job.job_id))
        return self.job.done()


def execute_jobs(
    runs: list[Run],
    launcher: LauncherConfig,
    logs_dir: Path,
    *,
    selected: Optional[set[str]] = None,
    python: str,
    echo: Callable[[str], None] = print,
) -> dict[str, RunStatus]:
    """Submit every selected run that is not complete as soon as the runs it needs are done; wait for all."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(launcher, logs_dir / "jobs")
    statuses: dict[str, RunStatus] = {}
    pending = [r for r in runs]
    active: dict[str, _Active] = {}
    waiting = {r.id for r in runs}
    try:
        while pending or active:
            moved = False
            for run in list(pending):
                if any(d in waiting for d in run.depends):
                    continue  # what it needs is not done yet
                pending.remove(run)
                moved = True
                state, settled = decide(run, statuses, selected, echo)
                if settled is not None:
                    statuses[run.id] = settled
                    waiting.discard(run.id)
                    marker = read_marker(run)
                    if settled.state == "complete" and marker.get("collected") is False:
                        kept = {k: v for k, v in marker.items() if k not in ("run", "fingerprint")}
                        _write_marker(run, **{**kept, "collected": True})
                    continue
                active[run.id] = _attach(run, launcher, logs_dir, echo) or _submit(
                    run, state, executor, launcher, logs_dir, python, echo
                )
            for run_id, item in list(active.items()):
                if item.finished(launcher.cluster):
                    statuses[run_id] = _collect(item, echo)
                    del active[run_id]
                    waiting.discard(run_id)
                    moved = True
            if active and not moved:
                time.sleep(launcher.poll_s)
    except KeyboardInterrupt:
        if active:
            echo(f"stopped: {len(active)} job(s) keep running ({', '.join(active)}); rerun the same command to "
                 f"collect them.")
        raise
    return statuses


def _attach(run: Run, launcher: LauncherConfig, logs_dir: Path, echo: Callable[[str], None]) -> Optional[_Active]:
    """The still queued or running job of an earlier invocation for this run (its marker says submitted)."""
    marker = read_marker(run)
    if marker.get("status") != "submitted" or marker.get("cluster") != launcher.cluster or not marker.get("job_id"):
        return None
    import submitit

    folder, job_id = logs_dir / "jobs", str(marker["job_id"])
    if launcher.cluster == "local":
        job = submitit.LocalJob(folder=folder, job_id=job_id)
        alive = not job.paths.result_pickle.exists() and _pid_alive(int(job_id))
    else:
        job = submitit.SlurmJob(folder=folder, job_id=job_id)
        alive = job.state in _LIVE
    if not alive:
        return None
    echo(f"[wait]    {run.id}: job {job_id} of an earlier invocation is still queued or running")
    return _Active(run, job, _log_path(run, logs_dir), float(marker.get("started", time.time())), attached=True)


def _submit(run: Run, state: str, executor: Any, launcher: LauncherConfig, logs_dir: Path, python: str,
            echo: Callable[[str], None]) -> _Active:
    if state == "stale":
        old = _set_aside(run.output_dir)
        echo(f"[stale]   {run.id}: made from other settings; kept aside as {old}")
    cmd = run.command(launcher, python)
    log = _log_path(run, logs_dir)
    executor.update_parameters(name=run.id)
    task = RunTask(run.id, run.kind, str(run.output_dir), run.fingerprint, cmd, str(log), launcher.gpus_per_node == 0)
    job = executor.submit(task)
    started = time.time()
    _write_marker(run, status="submitted", command=cmd, job_id=str(job.job_id), cluster=launcher.cluster,
                  started=started)
    verb = {"partial": "resubmit", "stale": "submit"}.get(state, "submit")
    pad = " " * max(1, 9 - len(verb))
    echo(f"[{verb}]{pad}{run.id}: job {job.job_id}, {launcher.processes} process(es) (log: {log})")
    return _Active(run, job, log, started)


def _collect(item: _Active, echo: Callable[[str], None]) -> RunStatus:
    """What became of a run whose job ended: its exit status, or why the job itself stopped."""
    run, job = item.run, item.job
    seconds = time.time() - item.start
    try:
        results = job.results() if not item.attached else [None]
        rc, why = results[0], ""
    except Exception as err:  # noqa: BLE001 - submitit's errors for a job that was cancelled, timed out, or crashed
        rc, why = -1, f"job {job.job_id} did not complete: {str(err).strip().splitlines()[0][:300]}"
    marker = read_marker(run)
    if item.attached and marker.get("status") in ("done", "failed"):
        rc = 0 if marker["status"] == "done" else int(marker.get("returncode") or -1)
    elif item.attached:
        rc, why = -1, f"job {job.job_id} ended without a result (cancelled, timed out or pre-empted)"
    ok = rc == 0 and outputs_exist(run)
    detail = "" if ok else (why or (f"exit status {rc}" if rc else "exited 0 but wrote no results"))
    _write_marker(run, status="done" if ok else "failed", command=marker.get("command"), job_id=str(job.job_id),
                  seconds=marker.get("seconds", seconds), returncode=rc, detail=detail, collected=True)
    if ok:
        echo(f"[done]    {run.id}: job {job.job_id} in {seconds:.0f} s")
        return RunStatus(run.id, "ran", "", seconds, str(item.log))
    tail = _tail(item.log)
    echo(f"[FAILED]  {run.id}: {detail} (log: {item.log})\n{tail}")
    return RunStatus(run.id, "failed", f"{detail}; last line: {tail.splitlines()[-1].strip() if tail else '-'}",
                     seconds, str(item.log))


def _log_path(run: Run, logs_dir: Path) -> Path:
    return logs_dir / (run.id.replace("/", "__") + ".log")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
