"""Two nodes on one machine (CPU, gloo) train to the same weights as two processes on one node.

The two-node run is recipes/launch/slurm_multinode.sh itself, as sbatch would start it, with stand-ins
for SLURM's `srun` (both node tasks started here, in the background, SLURM_NODEID 0 and 1) and
`scontrol` (the main node is 127.0.0.1): each node runs `accelerate launch --num_machines 2 --machine_rank R
--main_process_ip 127.0.0.1 --main_process_port P` with one process. The one-node reference is
`torchrun --standalone --nproc_per_node 2`.
"""

from __future__ import annotations

import os
import sys

import pytest
from dist_launch import REPO, STEPS, TINY_MAE, assert_same_tensors, backbone, free_port, run, trainer_state

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SLURM_SCRIPT = REPO / "recipes" / "launch" / "slurm_multinode.sh"
RECIPE = REPO / "recipes" / "mae_pretrain.py"

FAKE_SRUN = """#!/bin/bash
# srun stand-in: the SLURM_NNODES node tasks on this machine, in the background, each with its SLURM_NODEID.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
echo 127.0.0.1  # `scontrol show hostnames $SLURM_JOB_NODELIST`: the main node first
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    one = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RECIPE),
         *TINY_MAE, f"output_dir={root / 'one_node'}"],
    )
    assert one.returncode == 0, one.stderr[-3000:]

    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "1",
        "MAIN_PORT": str(free_port()),
    }
    two = run(["bash", str(SLURM_SCRIPT), str(RECIPE), *TINY_MAE, f"output_dir={root / 'two_nodes'}"], env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    return root


def test_two_nodes__one_process_group_of_two(runs):
    state = trainer_state(runs / "two_nodes")
    assert state["world_size"] == 2 and state["step"] == STEPS and state["images_seen"] == 8 * STEPS
    rng = runs / "two_nodes" / "checkpoint-last" / "rng"
    assert sorted(p.name for p in rng.iterdir()) == ["rank0.pt", "rank1.pt"]


def test_two_nodes__same_weights_as_two_processes_on_one_node(runs):
    assert trainer_state(runs / "one_node")["world_size"] == 2
    assert_same_tensors(backbone(runs / "two_nodes"), backbone(runs / "one_node"))
