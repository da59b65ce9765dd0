import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# make test runs a pytest-xdist worker per core: one torch thread each (two threads per worker would oversubscribe)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny-model calls: with several threads, synchronisation costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """A small synthetic-world dataset shared by the tests: 4 shards of 40 clips, 8 x 32 x 32."""
    from lifecycle.data.synthetic import write_shards

    out = tmp_path_factory.mktemp("data") / "synthetic"
    write_shards(out, num_clips=160, clips_per_shard=40, frames=8, size=32, seed=0, progress=False)
    return str(out)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items):
    """Mark every test with its group (unit, stage or recipe; tests/groups.py) unless it names one itself."""
    from .groups import GROUPS, group_of

    for item in items:
        if not any(item.get_closest_marker(group) for group in GROUPS):
            item.add_marker(group_of(item.path.name, item.originalname))
