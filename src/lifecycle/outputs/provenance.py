"""Provenance of exported samples: the model and its lineage of exports, recipe, stage, seed and time.

`context(cfg)` is what a stage run knows (taken once by lifecycle.outputs.configure). The sink writes the
full record as `provenance.json` beside the samples and a compact copy (`compact`) into each file: the
`comment` tag of every mp4 and gif, the PNG text chunk `Comment` of filmstrip.png; `read_embedded` reads it back.
"""

import json
from datetime import datetime, timezone
from pathlib import Path

import av
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from .. import __version__

LINEAGE_KEYS = ("recipe", "stage", "parent", "step", "run_dir")
PNG_KEY = "Comment"


def lineage(export: str | None) -> list[dict]:
    """The chain of exports from `export` back to its root: each with its path and its `lineage.json`'s
    recipe, stage, parent, step and run_dir; the chain ends at the first one without a lineage.json
    (a hub id, or a model built from config), which is listed by its path only."""
    from ..models.bundle import LINEAGE_FILE  # diffusers: not for the import of this package

    chain, seen = [], set()
    while export and export not in seen:
        seen.add(export)
        entry = {"export": export}
        chain.append(entry)
        file = Path(export).expanduser() / LINEAGE_FILE
        if not file.is_file():
            break
        made = json.loads(file.read_text())
        entry.update({key: made.get(key) for key in LINEAGE_KEYS})
        export = made.get("parent")
    return chain


def context(cfg: DictConfig | None) -> dict:
    """What a stage run records of every sample it exports: recipe, stage, run directory, seed, the model it
    started from (`model.pretrained`, null: built from config) with its lineage, and the content filter's
    config; all None without a config."""
    if cfg is None:
        return dict.fromkeys(("recipe", "stage", "run_dir", "seed", "model", "filter"))
    pretrained = cfg.model.get("pretrained")
    flt = cfg.outputs.filter
    return {"recipe": cfg.get("recipe"), "stage": cfg.stage.name, "run_dir": str(cfg.run_dir), "seed": cfg.seed,
            "model": {"pretrained": pretrained, "lineage": lineage(pretrained)},
            "filter": None if flt is None else OmegaConf.to_container(flt, resolve=True)}


def record(context: dict, samples: list[dict], watermark: dict | None, blocked: int | None) -> dict:
    """The provenance of one output folder: lifecycle version, UTC time, `context`, how many samples the content
    filter blocked (None: no filter), the watermark and one entry per sample."""
    time = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"lifecycle": __version__, "time": time, **context, "blocked": blocked, "watermark": watermark,
            "samples": samples}


def compact(record: dict, index: int | None = None) -> str:
    """The copy embedded in a file: `record` without the samples list and the watermark check (done after
    writing), plus sample `index`'s entry (None: every sample's, for the filmstrip), as one-line JSON."""
    copy = {k: v for k, v in record.items() if k != "samples"}
    if copy.get("watermark"):
        copy["watermark"] = {k: copy["watermark"][k] for k in ("message", "method")}
    if index is None:
        copy["samples"] = record["samples"]
    else:
        copy["sample"] = record["samples"][index]
    return json.dumps(copy, separators=(",", ":"))


def read_embedded(path: str | Path) -> dict | None:
    """The provenance embedded in an exported file (png text chunk; mp4, webm or gif comment), or None."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        with Image.open(path) as image:
            text = image.text.get(PNG_KEY)
    else:
        with av.open(str(path)) as container:
            text = {k.lower(): v for k, v in container.metadata.items()}.get("comment")
    return json.loads(text) if text else None
