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
