"""`python -m lifecycle stage=curate`: raw media -> curated, recaptioned webdataset shards.

    for each unit of work (files or a shard), in worker processes:       1. inspect
        decode and validate (corrupt: skipped, counted), filter (size, length, aspect), hash, embed
    over all units: exact and near duplicates, the first of each group kept  2. deduplicate
    for each unit, the kept clips:                                        3. describe and write
        annotate motion, score (motion; aesthetic = the configured `reward`), safety filter,
        recaption (keeping the original caption) -> shard-<unit>.tar
    manifest.jsonl (one row per input: kept, or the step and reason that dropped it), report.md + PNGs

Scale-out: the same command runs as rank r of N (RANK/WORLD_SIZE from torchrun, or SLURM_PROCID/SLURM_NTASKS),
each rank taking units u with u mod N = r and sharing `stage.out`; ranks meet only through files there (each
waits for every unit's inspection before deduplicating). Each unit's results are written atomically, so a
re-run skips finished units and a finished run (curate.json) does nothing.
"""

import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import CONF_DIR
from ..errors import ConfigError
from ..data.video_io import write_atomically
from ..rewards.base import WeightedSum, build_reward
from .annotate import annotate, frame_difference
from .dedup import content_hash, find_duplicates, thumbnail_embedding
from .filters import size_filter
from .media import Unit, decode, list_units, read_unit
from .report import write_report

log = logging.getLogger(__name__)
DONE = "curate.json"
WORK = ".work"


def aesthetic_reward(names) -> WeightedSum | None:
    """`stage.aesthetic` (names of conf/reward configs) -> their weighted sum, or None when empty."""
    if not names:
        return None
    return build_reward({name: OmegaConf.load(Path(CONF_DIR) / "reward" / f"{name}.yaml") for name in names})


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks, from torchrun's or SLURM's environment (else 0 of 1)."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if world in os.environ:
            return int(os.environ.get(rank, 0)), int(os.environ[world])
    return 0, 1


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class Curator:
    """The per-clip steps, built once from the stage config (models included) and shared by the workers."""

    def __init__(self, cfg):
        s = cfg.stage
        self.input, self.work = s.input, Path(s.out) / WORK
        self.filters, self.dedup, self.annotate = dict(s.filters), dict(s.dedup), dict(s.annotate)
        self.reward = aesthetic_reward(s.aesthetic)
        self.captioner = instantiate(s.recaption, _convert_="all") if s.recaption else None
        self.safety = instantiate(s.safety, _convert_="all") if s.safety else None

    def inspect(self, unit: Unit) -> None:
        """Step 1 for one unit -> inspect-<unit>.jsonl (a row per item) and .npy (embeddings of the valid ones)."""
        rows, embeddings = [], []
        for i, item in enumerate(read_unit(unit, self.input)):
            row = {"unit": unit.index, "index": i, "source": item.source, "original_caption": item.caption}
            try:
                video = decode(item.data, item.ext)
            except Exception as exc:  # noqa: BLE001 - any unreadable input is skipped and counted, never fatal
                rows.append({**row, "kept": False, "step": "decode", "reason": str(exc)[:200]})
                continue
            row |= {"frames": int(video.shape[0]), "height": int(video.shape[1]), "width": int(video.shape[2])}
            if (why := size_filter(video, **self.filters)) is not None:
                rows.append({**row, "kept": False, "step": "filter", "reason": why})
                continue
            rows.append({**row, "hash": content_hash(item.data)})
            embeddings.append(thumbnail_embedding(video, self.dedup["frames"], self.dedup["size"]))
        dim = 3 * self.dedup["frames"] * self.dedup["size"] ** 2
        buffer = io.BytesIO()
        np.save(buffer, np.stack(embeddings).astype(np.float16) if embeddings else np.zeros((0, dim), np.float16))
        write_atomically(self.work / f"inspect-{unit.index:05d}.npy", buffer.getvalue())
        write_atomically(self.work / f"inspect-{unit.index:05d}.jsonl", _jsonl(rows))

    def describe(self, unit: Unit, rows: list[dict]) -> None:
        """Step 3 for one unit: the rows that survived deduplication are annotated, scored, safety-checked and
        recaptioned; the kept ones go to shard-<unit>.tar; all rows to unit-<unit>.jsonl."""
        items = {i: item for i, item in enumerate(read_unit(unit, self.input)) if rows[i].get("kept") is None}
        videos = {i: decode(item.data, item.ext) for i, item in items.items()}
        order = list(videos)
        for i in order:
            ann = annotate(videos[i], **self.annotate)
            rows[i] |= {"annotation": ann, "motion": frame_difference(videos[i])}
        for i in order if self.reward is not None else ():
            clip = torch.from_numpy(videos[i]).permute(0, 3, 1, 2).float()[None] / 255
            with torch.no_grad():
                parts = {name: float(v) for name, v in self.reward.components(clip, [rows[i]["original_caption"]]).items()}
            rows[i] |= {**parts, "aesthetic": sum(self.reward.weights[n] * v for n, v in parts.items())}
        if self.safety is not None and order:
            for i, score in zip(order, self.safety.scores([videos[i] for i in order])):
                rows[i]["unsafe"] = score
                if score >= self.safety.threshold:
                    rows[i] |= {"kept": False, "step": "safety", "reason": f"unsafe score {score:.3f}"}
            order = [i for i in order if rows[i].get("kept") is None]
        if self.captioner is not None and order:
            out = self.captioner([videos[i] for i in order], [rows[i]["annotation"] for i in order],
                                 [rows[i]["original_caption"] for i in order])
            for i, new in zip(order, out):
                rows[i] |= new if isinstance(new, dict) else {"caption": new}
        for i in order:
            rows[i]["kept"] = True
            rows[i].setdefault("caption", rows[i]["original_caption"])
        shard = None
        if order:
            shard = f"shard-{unit.index:06d}.tar"
            tmp = self.work.parent / f".{shard}.tmp"
            with wds.TarWriter(str(tmp), mtime=0) as sink:
                for i in order:
                    meta = {k: v for k, v in rows[i].items() if k not in ("unit", "index", "kept", "hash")}
                    sink.write({"__key__": f"u{unit.index:05d}-{i:05d}", items[i].ext: items[i].data, "json": meta})
            os.replace(tmp, self.work.parent / shard)
        for r in rows:
            r["shard"] = shard if r["kept"] else None
        write_atomically(self.work / f"unit-{unit.index:05d}.jsonl", _jsonl(rows))


class _UnitWork(Dataset):
    """A DataLoader over units, so `stage.workers` processes share the work (models built once, before forking)."""

    def __init__(self, curator: Curator, units: list[Unit], step: str, rows: dict | None = None):
        self.curator, self.units, self.step, self.rows = curator, units, step, rows

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> int:
        unit = self.units[i]
        if self.step == "inspect":
            self.curator.inspect(unit)
        else:
            self.curator.describe(unit, self.rows[unit.index])
        return unit.index


def _run_units(curator: Curator, units: list[Unit], step: str, workers: int, rows: dict | None = None) -> None:
    if not units:
        return
    loader = DataLoader(_UnitWork(curator, units, step, rows), batch_size=None,
                        num_workers=min(workers, len(units)) if workers > 1 else 0,
                        worker_init_fn=lambda _: torch.set_num_threads(1))  # a core per worker
    for _ in tqdm(loader, total=len(units), desc=f"curate: {step}", unit="unit"):
        pass


def _wait_for(paths: list[Path], timeout: float, what: str) -> None:
    """Block until every path exists (other ranks write them); a clear error after `timeout` seconds."""
    start = time.monotonic()
    while missing := [p for p in paths if not p.exists()]:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"stage.wait_timeout: after {timeout:.0f} s, {len(missing)} units still lack their "
                               f"{what} (first: {missing[0].name}); is every rank running?")
        time.sleep(2)


def deduplicate(work: Path, units: list[Unit], threshold: float) -> dict[int, list[dict]]:
    """Step 2 over every unit's inspection: mark exact and near duplicates, in unit order. -> {unit: rows}."""
    rows = {u.index: _read_jsonl(work / f"inspect-{u.index:05d}.jsonl") for u in units}
    valid = [r for u in units for r in rows[u.index] if "hash" in r]
    embeddings = np.concatenate([np.load(work / f"inspect-{u.index:05d}.npy") for u in units]).astype(np.float32)
    for r, dup in zip(valid, find_duplicates([r["hash"] for r in valid], embeddings, threshold)):
        if dup is not None:
            j, kind, distance = dup
            how = f" (distance {distance:.4f})" if kind == "near" else ""
            r |= {"kept": False, "step": "dedup", "duplicate_of": valid[j]["source"],
                  "reason": f"{kind} duplicate of {valid[j]['source']}{how}"}
    return rows


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
    rank, world = rank_and_world()
    units = list_units(s.input, s.unit_size)
    mine = [u for u in units if u.index % world == rank]
    curator = Curator(cfg)
    times = {}

    start = time.monotonic()
    _run_units(curator, [u for u in mine if not (work / f"inspect-{u.index:05d}.jsonl").exists()], "inspect", s.workers)
    _wait_for([work / f"inspect-{u.index:05d}.jsonl" for u in units], s.wait_timeout, "inspection")
    times["inspect"] = time.monotonic() - start

    start = time.monotonic()
    rows = deduplicate(work, units, s.dedup.threshold)
    times["dedup"] = time.monotonic() - start

    start = time.monotonic()
    _run_units(curator, [u for u in mine if not (work / f"unit-{u.index:05d}.jsonl").exists()], "describe",
               s.workers, rows)
    times["describe"] = time.monotonic() - start
    if rank != 0:
        return {"rank": rank, "units": len(mine)}
    _wait_for([work / f"unit-{u.index:05d}.jsonl" for u in units], s.wait_timeout, "results")
    manifest = [r for u in units for r in _read_jsonl(work / f"unit-{u.index:05d}.jsonl")]
    write_atomically(out / "manifest.jsonl", _jsonl(manifest))
    summary = write_report(out, manifest, truth=s.truth, seconds=times, workers=s.workers * world)
    write_atomically(out / DONE, json.dumps(summary, indent=1).encode())
    return summary
