import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the toys module


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI machine has 2 shared cores; one thread per test is faster under contention and keeps
    # results comparable with the subprocess runs (which also use one thread).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
