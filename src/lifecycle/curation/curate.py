"""`python -m lifecycle stage=curate`: raw media -> curated, recaptioned webdataset shards, on Ray Data.

    pass 1, streamed over the units of work (a list of files, or a shard):          [tasks | actor pool]
        read -> check: decode and validate (corrupt: dropped, counted), filter (size, length, aspect), hash
             -> embed: pixel thumbnails (tasks), or a CLIP/SigLIP model (`stage.dedup.model`: actors)
        -> inspect-<unit>.jsonl + .npy, written as each unit ends
    deduplicate, over every unit: exact (hash) and near duplicates (a faiss index), the first of each kept
    pass 2, streamed over the units:
        read the clips still in -> describe: annotate motion, motion score (tasks)
             -> score: aesthetic = the configured rewards (actors) -> safety filter (actors)
             -> recaption (actors, e.g. a VLM on GPUs)
        -> shard-<unit>.tar + unit-<unit>.jsonl, written as each unit ends
    manifest.jsonl (one row per input: kept, or the step and reason that dropped it), report.md + PNGs

Ray runs the steps (`engine`): a local Ray of `stage.workers` CPUs started by the stage, or the cluster at
`stage.ray.address`. Results stream back in input order, so a unit's files are complete when written; written
atomically, they let a re-run skip finished units, and a finished run (curate.json) does nothing.
"""

import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import ray.data
import webdataset as wds
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from ..errors import ConfigError
from ..data.video_io import write_atomically
from . import steps
from .dedup import find_duplicates
from .engine import add_step, ray_session
from .media import Unit, list_units
from .report import write_report

log = logging.getLogger(__name__)
DONE = "curate.json"
WORK = ".work"


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _units(units: list[Unit], rows: dict | None = None) -> ray.data.Dataset:
    """A Ray dataset of units, a block each, with their rows after deduplication in pass 2."""
    items = [{"unit": u.index, "files": list(u.files), "shard": u.shard or "",
              "rows": json.dumps(rows[u.index]) if rows else ""} for u in units]
    return ray.data.from_items(items, override_num_blocks=len(items))


def _by_unit(ds, units: list[Unit], columns: list[str], desc: str):
    """(unit index, [row of columns, ...]) for each unit in order, from the dataset's ordered stream; units that
    yield no clip come last, with an empty list."""
    seen, current, clips = set(), None, []
    with tqdm(total=len(units), desc=f"curate: {desc}", unit="unit") as bar:
        for batch in ds.select_columns(columns).iter_batches(batch_size=None, batch_format="numpy"):
            for values in zip(*(batch[c] for c in columns)):
                unit = int(values[0])
                if unit != current and current is not None:
                    yield current, clips
                    bar.update()
                    clips = []
                seen.add(unit)
                current = unit
                clips.append(dict(zip(columns, values)))
        if current is not None:
            yield current, clips
            bar.update()
        for u in units:
            if u.index not in seen:
                yield u.index, []
                bar.update()


def inspect(s, units: list[Unit], root: str, work: Path) -> None:
    """Pass 1 over the units not yet inspected -> inspect-<unit>.jsonl (a row per clip) and .npy (float16
    embeddings of the clips still in)."""
    if not units:
        return
    ds = _units(units).flat_map(steps.read, fn_kwargs={"root": root})
    ds = add_step(ds, steps.check, s.ray.batch_size, filters=dict(s.filters), dedup=dict(s.dedup),
                  thumbnails=s.dedup.model is None)
    if s.dedup.model is not None:
        ds = add_step(ds, steps.Embed, 0, actor=dict(s.ray.models.embed), model=s.dedup.model, frames=s.dedup.frames)
    for unit, clips in _by_unit(ds, units, ["unit", "row", "embedding"], "inspect"):
        rows = [json.loads(c["row"]) for c in clips]
        emb = [np.frombuffer(c["embedding"], np.float16) for c, r in zip(clips, rows) if "hash" in r]
        buffer = io.BytesIO()
        np.save(buffer, np.stack(emb) if emb else np.zeros((0, 0), np.float16))
        write_atomically(work / f"inspect-{unit:05d}.npy", buffer.getvalue())
        write_atomically(work / f"inspect-{unit:05d}.jsonl", _jsonl(rows))


def deduplicate(work: Path, units: list[Unit], dedup) -> dict[int, list[dict]]:
    """Exact and near duplicates over every unit's inspection, in unit order. -> {unit: rows}."""
    rows = {u.index: _read_jsonl(work / f"inspect-{u.index:05d}.jsonl") for u in units}
    valid = [r for u in units for r in rows[u.index] if "hash" in r]
    parts = [a for a in (np.load(work / f"inspect-{u.index:05d}.npy") for u in units) if a.size]
    embeddings = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 1), np.float32)
    found = find_duplicates([r["hash"] for r in valid], embeddings, dedup.threshold, neighbours=dedup.neighbours,
                            index=dedup.index, exact_up_to=dedup.exact_up_to, nprobe=dedup.nprobe,
                            ef_search=dedup.ef_search)
    for r, dup in zip(valid, found):
        if dup is not None:
            j, kind, distance = dup
            how = f" (distance {distance:.4f})" if kind == "near" else ""
            r |= {"kept": False, "step": "dedup", "duplicate_of": valid[j]["source"],
                  "reason": f"{kind} duplicate of {valid[j]['source']}{how}"}
    return rows


def _write_unit(out: Path, unit: int, rows: list[dict], clips: list[dict]) -> None:
    """A unit's results: its described clips merged into its rows; the kept ones -> shard-<unit>.tar (their
    media bytes as they came, the row as json), every row -> .work/unit-<unit>.jsonl."""
    media = {}
    for c in clips:
        rows[int(c["index"])] = json.loads(c["row"])
        media[int(c["index"])] = (c["ext"], c["data"])
    kept = [i for i, r in enumerate(rows) if r.get("kept") is None]
    shard = f"shard-{unit:06d}.tar" if kept else None
    if kept:
        tmp = out / f".{shard}.tmp"
        with wds.TarWriter(str(tmp), mtime=0) as sink:
            for i in kept:
                rows[i] |= {"kept": True, "caption": rows[i].get("caption", rows[i]["original_caption"])}
                meta = {k: v for k, v in rows[i].items() if k not in ("unit", "index", "kept", "hash")}
                ext, data = media[i]
                sink.write({"__key__": f"u{unit:05d}-{i:05d}", ext: data, "json": meta})
        os.replace(tmp, out / shard)
    for r in rows:
        r["shard"] = shard if r["kept"] else None
    write_atomically(out / WORK / f"unit-{unit:05d}.jsonl", _jsonl(rows))


def describe(s, units: list[Unit], rows: dict, root: str, out: Path) -> None:
    """Pass 2 over the units not yet written: the clips that survived deduplication are annotated, scored,
    safety-checked and recaptioned, then written."""
    if not units:
        return
    settings = OmegaConf.to_container(s, resolve=True)
    models = settings["ray"]["models"]
    ds = _units(units, rows).flat_map(steps.read, fn_kwargs={"root": root})
    ds = add_step(ds, steps.describe, s.ray.batch_size, annotate_args=settings["annotate"])
    if settings["aesthetic"]:
        ds = add_step(ds, steps.Score, 0, actor=models["score"], spec=settings["aesthetic"])
    if settings["safety"]:
        ds = add_step(ds, steps.Safety, 0, actor=models["safety"], cfg=settings["safety"])
    if settings["recaption"]:
        ds = add_step(ds, steps.Recaption, 0, actor=models["recaption"], cfg=settings["recaption"])
    for unit, clips in _by_unit(ds, units, ["unit", "index", "row", "ext", "data"], "describe"):
        _write_unit(out, unit, rows[unit], clips)


def _params(cfg) -> dict:
    """What the results depend on: a re-run with other settings must not mix with these."""
    s = OmegaConf.to_container(cfg.stage, resolve=True)
    return {k: s[k] for k in ("input", "unit_size", "filters", "dedup", "annotate", "aesthetic", "recaption", "safety")}


def run(cfg) -> dict:
    s = cfg.stage
    if s.generate is not None and not os.path.exists(s.input):
        instantiate(s.generate)
    out, work = Path(s.out), Path(s.out) / WORK
    if (out / DONE).is_file():
        done = json.loads((out / DONE).read_text())
        log.info("curated shards in %s are complete (%d of %d clips kept): nothing to do", out, done["kept"], done["inputs"])
        return done
    work.mkdir(parents=True, exist_ok=True)
    params = _params(cfg)
    recorded = work / "params.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != params:
        raise ConfigError(f"stage.out: {out} holds a curation run with other settings; delete it or choose another folder")
    write_atomically(recorded, json.dumps(params, indent=1).encode())
    units = list_units(s.input, s.unit_size)
    root = str(Path(s.input).resolve())
    times = {}
    start = time.monotonic()
    with ray_session(s.ray.address, s.workers, s.ray.object_store_mb, Path(cfg.run_dir) / "ray") as session:
        cores = s.workers if s.ray.address is None else int(session.cluster_resources().get("CPU", 1))
        times["start"] = time.monotonic() - start

        start = time.monotonic()
        inspect(s, [u for u in units if not (work / f"inspect-{u.index:05d}.jsonl").exists()], root, work)
        times["inspect"] = time.monotonic() - start

        start = time.monotonic()
        rows = deduplicate(work, units, s.dedup)
        times["dedup"] = time.monotonic() - start

        start = time.monotonic()
        describe(s, [u for u in units if not (work / f"unit-{u.index:05d}.jsonl").exists()], rows, root, out)
        times["describe"] = time.monotonic() - start
    manifest = [r for u in units for r in _read_jsonl(work / f"unit-{u.index:05d}.jsonl")]
    write_atomically(out / "manifest.jsonl", _jsonl(manifest))
    summary = write_report(out, manifest, truth=s.truth, seconds=times, workers=cores)
    write_atomically(out / DONE, json.dumps(summary, indent=1).encode())
    return summary
