"""A curated subset of a shard set (SFT's high-quality data): by metadata score, attribute, or a key list."""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path


class Selection:
    """Keeps a raw webdataset sample when every rule holds.

    `min`: metadata score >= threshold (e.g. `{aesthetic: 5.5}`); `where`: metadata value in the
    allowed values (e.g. `{background: [black]}`); `keys`: a text file of sample keys, one per line.
    A sample lacking a metadata field a rule names is dropped.
    """

    def __init__(self, min: Mapping[str, float] | None = None, where: Mapping[str, Sequence | str] | None = None,
                 keys: str | None = None):
        self.min = dict(min or {})
        self.where = {k: set(v) if isinstance(v, (list, tuple)) else {v} for k, v in (where or {}).items()}
        self.keys = None
        if keys is not None:
            if not Path(keys).is_file():
                raise FileNotFoundError(f"data.select.keys: no key list {keys!r}")
            self.keys = {line.strip() for line in Path(keys).read_text().splitlines() if line.strip()}

    def __call__(self, sample: dict) -> bool:
        if self.keys is not None and sample.get("__key__") not in self.keys:
            return False
        if not (self.min or self.where):
            return True
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if any(not isinstance(meta.get(k), (int, float)) or meta[k] < v for k, v in self.min.items()):
            return False
        return all(meta.get(k) in allowed for k, allowed in self.where.items())
