import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # reliability_common, faulty_launch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # In-process recipe runs use one thread, as the child processes do (OMP_NUM_THREADS=1): the 2 CI
    # cores are shared, and one thread is the faster choice for these tiny models anyway.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mae_reference(tmp_path_factory):
    """backbone.safetensors of one uninterrupted tiny MAE recipe run (child process): what every
    interrupted, resumed run must equal bit for bit."""
    from reliability_common import TINY_MAE, TINY_STEPS, backbone_weights, checkpoint_step, launch

    out = tmp_path_factory.mktemp("mae_reference")
    proc = launch("mae_pretrain.py", *TINY_MAE, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert checkpoint_step(out) == TINY_STEPS
    return backbone_weights(out)
