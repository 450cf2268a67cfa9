"""Shared by every test: machine-specific choices stay out of ~/.cache and are the same in every process."""

import pytest

from ssl_vit.ops import linear


@pytest.fixture(autouse=True, scope="session")
def _plain_linears_and_a_temporary_cache(tmp_path_factory):
    # Backbones time their linear shapes once per machine (ssl_vit.ops.linear) and pick oneDNN or MKL
    # from it; a measurement skipped on a busy machine in one subprocess and made in the next would give
    # two runs compared bit for bit different kernels. The tests pin the plain path (tests/ops test the
    # choice itself, forcing and measuring explicitly) and keep any timings out of ~/.cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(linear.CACHE_ENV, str(tmp_path_factory.mktemp("ssl_vit_cache")))
        mp.setenv(linear.ENV, "0")
        yield
