import io
import itertools
import json
import os
import random
import tarfile

import numpy as np
import pytest
from torch.utils.data import DataLoader

from lifecycle.errors import ConfigError
from lifecycle.data.curriculum import Curriculum
from lifecycle.data.shards import CurriculumStream, balanced, list_shards
from .helpers import compose_cfg

PHASES = [
    {"name": "low", "resolution": 8, "frames": 2, "batch_size": 6, "steps": 3},
    {"name": "full", "resolution": 8, "frames": 2, "batch_size": 40, "steps": 100},
]
BALANCE = {"key": "animal"}


@pytest.fixture(scope="module")
def skewed_shards(tmp_path_factory):
    """4 shards of 50 tiny clips, 90% cats and 10% dogs; the caption names the animal. Plain ustar
    members: balancing reads ~10 samples per dog drawn, and pax headers double the tar parsing."""
    out = tmp_path_factory.mktemp("skewed")
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 8, 8, 3), np.uint8))
    for s in range(4):
        with tarfile.open(out / f"shard-{s:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * 50, s * 50 + 50):
                animal = "dog" if i % 10 == 3 else "cat"
                meta = json.dumps({"caption": f"{animal} {i:03d}", "animal": animal}).encode()
                for ext, data in (("npy", buf.getvalue()), ("json", meta)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return list_shards(str(out))


def batches(urls, n, start=0, workers=0, **kw):
    stream = CurriculumStream(urls, Curriculum(PHASES), seed=3, start_batch=start, shuffle_buffer=16, **kw)
    return [b["caption"] for b in itertools.islice(iter(DataLoader(stream, batch_size=None, num_workers=workers)), n)]


def dog_share(captions) -> float:
    return sum(c.startswith("dog") for c in captions) / len(captions)


def test_balance_draws_each_class_equally_often(skewed_shards):
    drawn = [c for b in batches(skewed_shards, 53, balance=BALANCE) for c in b]  # 3 * 6 + 50 * 40 samples
    assert len(drawn) >= 2000 and abs(dog_share(drawn) - 0.5) <= 0.04
    assert len({c for c in drawn if c.startswith("dog")}) == 20  # every dog, each revisited many times
    plain = [c for b in batches(skewed_shards, 53) for c in b]
    assert abs(dog_share(plain) - 0.1) <= 0.04


@pytest.mark.parametrize("split,workers,start", [("global", 0, 5), ("rank", 0, 5), ("global", 2, 5), ("rank", 2, 5)])
def test_balanced_stream_is_deterministic_and_resumes_exactly(skewed_shards, split, workers, start):
    full = batches(skewed_shards, 8, workers=workers, split=split, balance=BALANCE)
    assert full == batches(skewed_shards, 8, workers=workers, split=split, balance=BALANCE)
    assert batches(skewed_shards, 8 - start, start=start, workers=workers, split=split, balance=BALANCE) == full[start:]


def test_balanced_global_split_is_world_size_invariant(skewed_shards):
    one = batches(skewed_shards, 6, balance=BALANCE)
    ranks = [batches(skewed_shards, 6, rank=r, world_size=2, balance=BALANCE) for r in (0, 1)]
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == one


def test_a_listed_class_that_never_appears_is_named(skewed_shards):
    with pytest.raises(ValueError, match=r"data.balance.classes: no sample of class 'bird'"):
        batches(skewed_shards, 5, balance={"key": "animal", "classes": ["cat", "dog", "bird"]})


class Script:
    """A stand-in rng: `choice` returns the scripted classes in turn."""

    def __init__(self, *picks):
        self.picks = iter(picks)

    def choice(self, seq):
        pick = next(self.picks)
        assert pick in seq
        return pick


def sample(name, animal=None, raw=None):
    meta = {"animal": animal} if animal else {}
    return {"__key__": name, "json": raw if raw is not None else json.dumps(meta).encode()}


def test_balanced_queues_fifo_per_class_and_skips_bad_metadata():
    samples = [sample("c0", "cat"), sample("c1", "cat"), sample("c2", "cat"), sample("d0", "dog"),
               sample("bad", raw=b"{not json"), sample("nokey"), sample("b0", "bird"), sample("c3", "cat")]
    errors = []
    out = balanced(samples, "animal", ["cat", "dog"], Script("dog", "cat", "cat", "dog"), 2, errors.append)
    # dog: reads c0..d0 (c0 dropped: cat's queue holds 2); cat: c1, c2 queued; dog again: nothing left
    assert [s["__key__"] for s in out] == ["d0", "c1", "c2"]
    assert len(errors) == 2  # unreadable json, missing key; the unlisted bird is dropped without a count
    seen = balanced(samples, "animal", None, Script("cat", "cat", "cat", "cat", "dog", "bird", "cat"), 2, errors.append)
    assert [s["__key__"] for s in seen] == ["c0", "c1", "c2", "c3", "d0", "b0"]  # drawn among the classes seen so far


def test_balanced_on_an_endless_list_is_even_and_guards_missing_classes():
    stream = itertools.cycle([sample(f"c{i}", "cat") for i in range(9)] + [sample("d", "dog")])
    out = list(itertools.islice(balanced(stream, "animal", None, random.Random(0), 4, None), 4000))
    assert abs(sum(s["__key__"] == "d" for s in out) / 4000 - 0.5) <= 0.03
    with pytest.raises(ValueError, match=r"class 'bird'.* 400 samples"):
        list(itertools.islice(balanced(stream, "animal", ["cat", "bird"], random.Random(0), 4, None), 10))


def test_config_requires_a_balance_key(tmp_path, skewed_shards):
    shards = os.path.dirname(skewed_shards[0])
    assert compose_cfg(tmp_path, "data.balance={key:animal}", shards=shards).data.balance.key == "animal"
    with pytest.raises(ConfigError, match="data.balance.key"):
        compose_cfg(tmp_path, "data.balance={classes:[cat]}", shards=shards)
