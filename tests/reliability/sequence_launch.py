"""Several single-process recipe runs one after another in ONE child process: the recipe tests' reference
runs share the cost of starting a process (imports take longer than these tiny runs), as
tests/distributed/recipe_runs.py does for process groups.

    python tests/reliability/sequence_launch.py PLAN.json

PLAN.json is a list of runs, each {"recipe": "recipes/x.py" or a launcher script, "args": [...], "env": {...},
"faults": "..."}; `env` is set for that run only. Each run is run as `python <recipe> <args>` would run it
(runpy, run_name="__main__"); a launcher script (e.g. one that patches a class, then runs a recipe with runpy)
gets `args` as its argv. Faults (faulty_launch.py's syntax) are only allowed on the LAST run: they are armed
just before it (the wrappers would stay for any run after it), and a kill ends the process, so nothing can come
after a killed run anyway. Under torchrun (`torchrun ... sequence_launch.py PLAN.json`) the runs share one
process group; RELIABILITY_RANK=R arms the faults on that process only, as in faulty_launch.py.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faulty_launch import arm, parse_faults


def main() -> None:
    # As faulty_launch.py and recipes/pretrain.py do: the engine's "resuming from ... at step N" reaches stderr.
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    plan = json.loads(Path(sys.argv[1]).read_text())
    if any(run.get("faults") for run in plan[:-1]):
        raise SystemExit("sequence_launch.py: faults are allowed on the last run only")
    destroy = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and len(plan) > 1:
        # Under torchrun, as tests/distributed/recipe_runs.py: Accelerate's end_training() destroys the
        # process group, which the next run in this process needs again; that one call waits for the end.
        from accelerate.state import PartialState

        destroy = PartialState.destroy_process_group
        PartialState.destroy_process_group = lambda self, group=None: None
    rank = os.environ.get("RELIABILITY_RANK")  # as faulty_launch.py: faults on that process only
    for run in plan:
        faults = parse_faults(run.get("faults", ""))
        if faults and (rank is None or rank == os.environ.get("RANK", "0")):
            arm(faults)
        saved = {k: os.environ.get(k) for k in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        recipe = str(Path(run["recipe"]).resolve())
        sys.argv = [recipe, *run["args"]]
        sys.path.insert(0, str(Path(recipe).parent))
        runpy.run_path(recipe, run_name="__main__")
        sys.path.remove(str(Path(recipe).parent))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if destroy is not None:
        from accelerate.state import PartialState

        destroy(PartialState())


if __name__ == "__main__":
    main()
