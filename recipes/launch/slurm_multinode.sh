#!/bin/bash
# sbatch --nodes 4 recipes/launch/slurm_multinode.sh recipes/mae_pretrain.py model.name=vit_large_patch16_224
#   -> one process per GPU of every node (SLURM_NNODES x SLURM_GPUS_ON_NODE)
#
# Multi-node pretraining under SLURM: srun starts one task per node; each runs `accelerate launch`, which
# starts one training process per GPU of its node. The allocation's first node hosts the rendezvous
# (static: node r holds global ranks r*G .. r*G+G-1, the same every launch, so relaunching the same job
# resumes from output_dir/checkpoint-last bit for bit). Submit from the repository root; output_dir must be
# on a filesystem every node sees (each process writes its own random state, or shards under FSDP).
#
# Read from SLURM:  SLURM_JOB_NODELIST (its first host is the main node), SLURM_NNODES (--num_machines),
#                   SLURM_NODEID (--machine_rank, read on each node), SLURM_GPUS_ON_NODE (processes per node)
# Yours, optional:  ACCELERATE_CONFIG  an accelerate config file, e.g. recipes/configs/accelerate/fsdp_vit_large.yaml
#                                      (FSDP) or multi_gpu_bf16.yaml; unset: DDP (--multi_gpu), fp32
#                   GPUS_PER_NODE      processes per node (default SLURM_GPUS_ON_NODE, else 8)
#                   MAIN_PORT          rendezvous port on the main node (default 29500)
#                   MAIN_IP            the main node's address (default: the first host of the node list)
# The same script runs two "nodes" on one CPU machine in tests/distributed/test_multinode.py (a stand-in
# srun starts both tasks locally, ACCELERATE_USE_CPU=1, one process per node).
#
#SBATCH --job-name=ssl_vit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch $0 recipes/<recipe>.py [key=value ...]" >&2
    exit 2
fi

export MAIN_IP="${MAIN_IP:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MAIN_PORT="${MAIN_PORT:-29500}"
export PROCS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
    export LAUNCH_MODE="--config_file ${ACCELERATE_CONFIG}"
else
    export LAUNCH_MODE="--multi_gpu"
fi

# Single quotes: each node expands SLURM_NODEID itself. One failed node ends the job (--kill-on-bad-exit).
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch $LAUNCH_MODE \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes "$((SLURM_NNODES * PROCS_PER_NODE))" \
    --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" --same_network --rdzv_backend static \
    "$@"' slurm_multinode "$@"
