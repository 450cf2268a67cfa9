"""Run what a plan still needs, one subprocess at a time, and remember what each run was made from.

Each run folder gets `compare_run.json`: the run's fingerprint (script, config file contents, every
argument, and the fingerprints of what it depends on), its status and the command. A run is
- complete: its outputs exist and the marker says done with the same fingerprint -> skipped;
- partial (started, same fingerprint, outputs missing): rerun; pretraining resumes from
  `checkpoint-last` through `train.resume=auto`;
- stale (the plan changed what it is made from): the old folder is kept aside as `<dir>.stale-N`
  and the run starts afresh (a stale checkpoint must not be resumed with new settings).
A failed run is logged and reported; the runs that do not depend on it still run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ssl_vit.cluster import MARKER, results_exist, write_marker
from ssl_vit.compare.plan import LauncherConfig, Run

__all__ = ["MARKER", "RunStatus", "decide", "execute", "is_complete", "outputs_exist", "run_state"]


@dataclass
class RunStatus:
    """What happened to one run in this invocation."""

    run_id: str
    # "complete" (skipped), "ran", "failed", "blocked" (a dependency failed), "planned" (dry run),
    # "checkpoint" (nothing to run), "unselected" (left out by --only).
    state: str
    detail: str = ""
    seconds: Optional[float] = None
    log: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.state in ("complete", "ran", "checkpoint", "planned")


def outputs_exist(run: Run) -> bool:
    """The files a finished run leaves: metrics.json (eval) or backbone.safetensors + .json (pretrain)."""
    return results_exist(run.kind, run.output_dir)


def read_marker(run: Run) -> dict:
    try:
        data = json.loads((run.output_dir / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def run_state(run: Run) -> str:
    """"complete", "partial" (resume), "stale" (made from other settings), or "new"."""
    if run.kind == "checkpoint":
        return "complete"
    marker = read_marker(run)
    if not run.output_dir.exists():
        return "new"
    if marker and marker.get("fingerprint") != run.fingerprint:
        return "stale"
    if marker.get("status") == "done" and outputs_exist(run):
        return "complete"
    if not marker and outputs_exist(run):
        # Made outside this tool (or by a version without markers): trust it only for evaluations,
        # whose metrics.json is written last; a pretraining folder may hold an older run's export.
        return "complete" if run.kind == "eval" else "partial"
    return "partial"


def is_complete(run: Run) -> bool:
    return run_state(run) == "complete"


def _write_marker(run: Run, **fields) -> None:
    write_marker(run.output_dir, run.id, run.fingerprint, **fields)


def _set_aside(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.stale-{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.stale-{n}")
    path.rename(target)
    return target


def execute(
    runs: list[Run],
    launcher: LauncherConfig,
    logs_dir: Path,
    *,
    selected: Optional[set[str]] = None,
    dry_run: bool = False,
    python: str = sys.executable,
    echo: Callable[[str], None] = print,
) -> dict[str, RunStatus]:
    """Run every selected run that is not complete, in order; a failure blocks only its dependants.

    With `launcher.kind: submitit` each run is a job instead, and runs go out as soon as what they need is
    done (jobs.py).
    """
    if launcher.kind == "submitit" and not dry_run:
        from ssl_vit.compare.jobs import execute_jobs  # jobs.py builds on this module's helpers

        return execute_jobs(runs, launcher, logs_dir, selected=selected, python=python, echo=echo)
    statuses: dict[str, RunStatus] = {}
    for run in runs:
        state, settled = decide(run, statuses, selected, echo)
        if settled is not None:
            statuses[run.id] = settled
            continue
        cmd = run.command(launcher, python)
        if dry_run:
            what = {"new": "run", "partial": "resume", "stale": "rerun (settings changed)"}[state]
            statuses[run.id] = RunStatus(run.id, "planned", what)
            b = run.budget
            budget = (f" ({b['images_given']:,} images = {b['steps']} steps x {b['images_per_step']})"
                      if b.get("kind") == "images" else "")
            echo(f"[{what}] {run.id}{budget}\n    {_shell(cmd)}")
            continue
        if state == "stale":
            old = _set_aside(run.output_dir)
            echo(f"[stale]   {run.id}: made from other settings; kept aside as {old}")
        statuses[run.id] = _launch(run, cmd, logs_dir, launcher.timeout_s, resume=state == "partial", echo=echo)
    return statuses


def decide(run: Run, statuses: dict[str, RunStatus], selected: Optional[set[str]],
           echo: Callable[[str], None]) -> tuple[str, Optional[RunStatus]]:
    """(run_state, the run's status when it is not to run: a checkpoint, complete, unselected or blocked).

    `statuses` holds what became of the runs it depends on (they come first).
    """
    if run.kind == "checkpoint":
        return "complete", RunStatus(run.id, "checkpoint", run.checkpoint or "")
    state = run_state(run)
    if state == "complete" and any(statuses[d].state == "ran" for d in run.depends if d in statuses):
        # What it was made from was just (re)made (a DeiT teacher, a BEiT tokenizer, the checkpoint an
        # evaluation judges): set aside and run again from scratch. Resuming in place would keep the old
        # work: a pretraining what the old teacher taught, a fine-tune its finished checkpoint-last.
        state = "stale"
    if state == "complete":
        marker = read_marker(run)
        job = marker.get("job_id")
        if job and not marker.get("collected", True):  # its job ended after the last invocation stopped
            echo(f"[collect] {run.id}: job {job} finished ({run.output_dir})")
        else:
            echo(f"[skip]    {run.id}: complete ({run.output_dir})")
        return state, RunStatus(run.id, "complete", "outputs present", seconds=marker.get("seconds"))
    if selected is not None and run.id not in selected:
        return state, RunStatus(run.id, "unselected", "not run: not selected by --only")
    failed_deps = [d for d in run.depends if d in statuses and statuses[d].state in ("failed", "blocked")]
    if any(statuses.get(d) and statuses[d].state == "unselected" for d in run.depends):
        return state, RunStatus(run.id, "unselected", "not run: what it needs was not selected by --only")
    if failed_deps:
        status = RunStatus(run.id, "blocked", f"needs {', '.join(failed_deps)}, which did not complete")
        echo(f"[blocked] {run.id}: {status.detail}")
        return state, status
    return state, None


def _launch(run: Run, cmd: list[str], logs_dir: Path, timeout_s: Optional[float], *, resume: bool,
            echo: Callable[[str], None]) -> RunStatus:
    logs_dir.mkdir(parents=True, exist_ok=True)
    log = logs_dir / (run.id.replace("/", "__") + ".log")
    verb = ("resume" if run.kind == "pretrain" else "rerun") if resume else "run"
    echo(f"[{verb}]{' ' * (9 - len(verb))}{run.id} (log: {log})")
    _write_marker(run, status="started", command=cmd, started=time.time())
    start = time.perf_counter()
    cpu_start = _children_cpu()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with open(log, "a") as fh:
            fh.write(f"$ {_shell(cmd)}\n")
            fh.flush()
            # Its own process group, so a timeout or Ctrl-C stops `accelerate launch` and its workers too.
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
                detail = "" if rc == 0 else f"exit status {rc}"
            except subprocess.TimeoutExpired:
                _stop(proc)
                rc, detail = -1, f"stopped after the launcher's timeout_s={timeout_s:g}"
            except BaseException:  # Ctrl-C: stop the run; its marker says "started", so a rerun resumes it
                _stop(proc)
                raise
    except OSError as err:
        rc, detail = -1, f"could not start: {err}"
    seconds = time.perf_counter() - start
    # CPU seconds of the run's processes: unlike wall-clock, about the same on a busy machine.
    cpu_seconds = round(_children_cpu() - cpu_start, 1)
    if rc == 0 and not outputs_exist(run):
        rc, detail = -1, "exited 0 but wrote no " + ("metrics.json" if run.kind == "eval" else "backbone.safetensors")
    status = "done" if rc == 0 else "failed"
    _write_marker(run, status=status, command=cmd, seconds=seconds, cpu_seconds=cpu_seconds, returncode=rc,
                  detail=detail)
    if rc == 0:
        echo(f"[done]    {run.id} in {seconds:.0f} s (CPU time {cpu_seconds:.0f} s)")
        return RunStatus(run.id, "ran", "", seconds, str(log))
    tail = _tail(log)
    echo(f"[FAILED]  {run.id}: {detail} (log: {log})\n{tail}")
    return RunStatus(run.id, "failed", f"{detail}; last line: {tail.splitlines()[-1].strip() if tail else '-'}",
                     seconds, str(log))


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process (and the children they waited for)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the run's process group, then SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _shell(cmd: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)
