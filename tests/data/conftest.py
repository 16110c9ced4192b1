"""Shared fixtures: a small synthetic shard set and simulated ranks/workers."""

import pytest

from mqsam2.data.synth import write_synth

from .layouts import SAV_SIZE


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory):
    """8 videos x 12 frames at 72x96 in 4 shards, and 16 images in 4 shards."""
    return write_synth(
        tmp_path_factory.mktemp("synth"), 8, 12, SAV_SIZE, seed=3, images=16, shard_size=2, image_shard_size=4
    )


@pytest.fixture
def ranks(monkeypatch):
    """Pretend to be rank r of w and DataLoader worker k of n (webdataset reads these variables)."""

    def become(rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> None:
        for name, value in dict(
            RANK=rank, WORLD_SIZE=world_size, WORKER=worker, NUM_WORKERS=num_workers
        ).items():
            monkeypatch.setenv(name, str(value))

    return become


def pytest_configure(config):
    # pycocotools' decode trips numpy 2's copy-keyword deprecation on every call; it is not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation:DeprecationWarning")
