import pytest

from ssl_vit.ops import linear


@pytest.fixture(autouse=True, scope="session")
def _onednn_timings_in_a_temporary_cache(tmp_path_factory):
    # Backbones time their linear shapes once per machine (ssl_vit.ops.linear): keep those timings out
    # of ~/.cache for the tests, measured at most once per session.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(linear.CACHE_ENV, str(tmp_path_factory.mktemp("ssl_vit_cache")))
        yield
