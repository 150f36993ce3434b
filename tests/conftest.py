import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast instead of retrying

import kl_ae  # noqa: E402,F401  (the torchvision import fix runs before any test imports torchvision)
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _same_configs_on_every_cpu(monkeypatch):
    """A shipped config's ``on_cpu_without_bf16`` section applies by default on none of the test
    machines, so that a test reads the same config on an AMX and an AVX2-only CPU; the tests of the
    section (tests/test_config.py) switch it on themselves."""
    monkeypatch.setattr("kl_ae.config.cpu_without_bf16", lambda: False)


@pytest.fixture(scope="session")
def _cache_home(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch, _cache_home):
    """Files kl-ae caches (data.dead_leaves_fraction's images) go to a folder of the test session,
    never to the user's ~/.cache; subprocesses inherit it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_cache_home))
