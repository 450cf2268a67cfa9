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
def mae_reference(tmp_path_factory, _one_thread):
    """backbone.safetensors of one uninterrupted tiny MAE recipe run: what every interrupted, resumed run
    must equal bit for bit. Run in this process (one thread, as the child processes; a child process would
    add seconds of imports): the killed and relaunched child processes of test_kill_resume.py are compared
    with it, so in-process and child-process runs are checked to agree as well."""
    from reliability_common import TINY_MAE, TINY_STEPS, backbone_weights, checkpoint_step, load_recipe

    out = tmp_path_factory.mktemp("mae_reference")
    summary = load_recipe("mae_pretrain").main([*TINY_MAE, f"output_dir={out}"])
    assert summary["steps"] == TINY_STEPS
    assert checkpoint_step(out) == TINY_STEPS
    return backbone_weights(out)
