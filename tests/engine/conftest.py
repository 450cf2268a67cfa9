import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the toys module


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Session-wide (module fixtures such as reference runs must see it too): results that are compared
    # with torch.equal must come from the same thread count, and the subprocess runs use one thread.
    # One thread is also faster on the 2 shared CI cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, _one_thread):
    """One uninterrupted run of `toys.resume_run`: what every resumed run must equal."""
    from toys import resume_run

    out = tmp_path_factory.mktemp("reference")
    summary = resume_run(out)
    return out, summary
