"""The curation report: counts per step, a filmstrip of recaptioned clips and score histograms (PNG) and, given the
input's ground truth (the
embedded raw world's `truth.jsonl`), caption accuracy and how many planted duplicates and corrupt files
were caught."""

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from webdataset.tariterators import tarfile_samples

from ..data.synthetic import ATTRIBUTES
from ..data.video_io import save_filmstrip_png
from .media import decode


def caption_attributes(text: str) -> dict:
    """The first word of each attribute's vocabulary found in a caption (None where absent)."""
    words = re.findall(r"[a-z]+", text.lower())
    return {name: next((w for w in words if w in values), None) for name, values in ATTRIBUTES.items()}


def attribute_accuracy(rows: list[dict], truth: dict, field: str) -> dict:
    """Share of the true attributes a caption field states, per attribute and overall, over rows with truth."""
    judged = [(caption_attributes(r[field]), truth[r["source"]]) for r in rows
              if r["source"] in truth and "colour" in truth[r["source"]]]
    per = {a: sum(said[a] == true[a] for said, true in judged) / max(len(judged), 1) for a in ATTRIBUTES}
    return {"clips": len(judged), "overall": sum(per.values()) / len(per), **per}


def truth_scores(manifest: list[dict], truth: dict) -> dict:
    """Caption accuracy of the kept clips (new and original captions) and what was caught of each planted kind."""
    by_source = {r["source"]: r for r in manifest}
    kept = [r for r in manifest if r["kept"]]

    def caught(kind: str, step: str, same_original: bool = False) -> dict:
        planted = [t for t in truth.values() if t["kind"] == kind and t["file"] in by_source]
        hits = [t for t in planted if by_source[t["file"]].get("step") == step
                and (not same_original or by_source[t["file"]].get("duplicate_of") == t["duplicate_of"])]
        return {"planted": len(planted), "caught": len(hits)}

    clean_dropped = Counter(by_source[t["file"]].get("step") for t in truth.values()
                            if t["kind"] == "clean" and t["file"] in by_source and not by_source[t["file"]]["kept"])
    return {
        "caption_accuracy": attribute_accuracy(kept, truth, "caption"),
        "original_caption_accuracy": attribute_accuracy(kept, truth, "original_caption"),
        "exact_duplicates": caught("exact_duplicate", "dedup", same_original=True),
        "near_duplicates": caught("near_duplicate", "dedup", same_original=True),
        "corrupt": caught("corrupt", "decode"),
        "filter_rejects": caught("reject", "filter"),
        "clean_clips_dropped": dict(clean_dropped),  # look-alike clips taken for near duplicates, mostly
    }


def _histograms(out: Path, kept: list[dict]) -> list[str]:
    names = []
    for key in ("aesthetic", "motion"):
        values = [r[key] for r in kept if isinstance(r.get(key), (int, float))]
        if not values:
            continue
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(values, bins=40, color="tab:blue")
        ax.set(title=f"{key} score, kept clips (n={len(values)})", xlabel=key, ylabel="clips")
        fig.tight_layout()
        fig.savefig(out / f"hist_{key}.png", dpi=100)
        plt.close(fig)
        names.append(f"hist_{key}.png")
    labels = Counter(" ".join(filter(None, [r["annotation"]["motion"], r["annotation"]["direction"]]))
                     for r in kept if "annotation" in r)
    if labels:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(list(labels), list(labels.values()), color="tab:green")
        ax.set(title="temporal annotations, kept clips", ylabel="clips")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / "annotations.png", dpi=100)
        plt.close(fig)
        names.append("annotations.png")
    return names


def _examples(out: Path, n: int = 8) -> list[str]:
    """A filmstrip of the first `n` kept clips of the first shard, each labelled "original -> new caption"."""
    shard = next(iter(sorted(out.glob("shard-*.tar"))), None)
    if shard is None:
        return []
    videos, labels = [], []
    for sample in itertools.islice(tarfile_samples([{"url": str(shard)}]), n):
        meta = json.loads(sample["json"])
        ext = next(k for k in sample if k not in ("json", "__key__", "__url__", "__local_path__"))
        videos.append(decode(sample[ext], ext))
        labels.append(f"{meta['original_caption'][:24]!r} -> {meta['caption']}")
    save_filmstrip_png(out / "examples.png", videos, labels, scale=3)
    return ["examples.png"]


def write_report(out: Path, manifest: list[dict], truth: str | None, seconds: dict, workers: int) -> dict:
    """Write report.md and its PNGs into `out`; return the summary (also written as curate.json)."""
    kept = [r for r in manifest if r["kept"]]
    dropped = Counter(r["step"] for r in manifest if not r["kept"])
    reasons = Counter(r["reason"].split(":")[0] for r in manifest if r.get("step") == "filter")
    dedup = Counter(r["reason"].split()[0] for r in manifest if r.get("step") == "dedup")
    total = sum(v for k, v in seconds.items() if k != "start")  # the pipeline's time; Ray's start-up apart
    summary = {"inputs": len(manifest), "kept": len(kept), "dropped": dict(dropped), "filtered": dict(reasons),
               "duplicates": dict(dedup), "shards": len({r["shard"] for r in kept}), "seconds": seconds,
               "clips_per_s_per_core": len(manifest) / max(total, 1e-9) / max(workers, 1)}
    truth_rows = {}
    if truth:
        truth_rows = {t["file"]: t for t in map(json.loads, Path(truth).read_text().splitlines()) if t}
        summary["truth"] = truth_scores(manifest, truth_rows)
    pngs = _examples(out) + _histograms(out, kept)
    lines = ["# Curation report", "", f"{len(manifest)} inputs, {len(kept)} kept in {summary['shards']} shards "
             f"({total:.1f} s, {summary['clips_per_s_per_core']:.1f} clips/s per core over {workers} workers; "
             f"{seconds.get('start', 0):.1f} s more to start Ray).", "",
             "| step | dropped | detail |", "|---|---|---|",
             f"| decode (corrupt, unreadable, truncated) | {dropped.get('decode', 0)} | |",
             f"| filter | {dropped.get('filter', 0)} | {dict(reasons)} |",
             f"| deduplicate | {dropped.get('dedup', 0)} | {dict(dedup)} |",
             f"| safety | {dropped.get('safety', 0)} | |", f"| **kept** | **{len(kept)}** | |", ""]
    if "truth" in summary:
        t = summary["truth"]
        lines += ["## Against the ground truth", "", "| measure | value |", "|---|---|"]
        for field in ("caption_accuracy", "original_caption_accuracy"):
            acc = t[field]
            detail = ", ".join(f"{a} {acc[a]:.3f}" for a in ATTRIBUTES)
            lines.append(f"| {field.replace('_', ' ')} ({acc['clips']} kept clips) | {acc['overall']:.3f} ({detail}) |")
        for kind in ("exact_duplicates", "near_duplicates", "corrupt", "filter_rejects"):
            lines.append(f"| {kind.replace('_', ' ')} caught | {t[kind]['caught']} of {t[kind]['planted']} |")
        lines.append(f"| clean clips dropped | {t['clean_clips_dropped'] or 0} |")
        lines.append("")
    lines += [f"![{p}]({p})" for p in pngs]
    examples = [f"- `{r['source']}`: \"{r['original_caption']}\" → \"{r['caption']}\"" for r in kept[:8]]
    lines += ["", "## Recaptions (first kept clips)", "", *examples, ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary
