"""Shared fixtures. Prefect is isolated per test session before anything imports it."""
import os
import tempfile

# Isolate Prefect (own PREFECT_HOME, generous ephemeral start-up on a fresh SQLite db, no telemetry).
_PREFECT_HOME = tempfile.mkdtemp(prefix="parapipe-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (ephemeral server + database) shared by every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


# ParaRL's starting point, built once per session (minutes on 2 cores): tests/test_pararl.py and
# tests/test_faults.py both run ParaRL on it, under their own run ids
@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory):
    from tests.test_pararl import build_sft_checkpoint

    return build_sft_checkpoint(tmp_path_factory.mktemp("rl"))


@pytest.fixture(scope="session")
def random_clip(sft_checkpoint):
    from tests.test_pararl import build_random_clip

    return build_random_clip(sft_checkpoint[2])
