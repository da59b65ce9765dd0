"""The evaluation report (`stage=eval`): metric tables, sample grids and training curves, as report.md and
report.html side by side.

Grids are tiled from the exported sample files, so they show what the output policy let out (a blocked sample is
grey there too); they are report figures, not exported samples, and carry no watermark of their own.
"""

import csv
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.video_io import decode_video, write_atomically, write_video
from ..models.bundle import LINEAGE_FILE
from ..data.oracle import ORACLE_COLUMNS

CELL = 128  # px a side of one video in a grid
# (key, heading, digits): the quality columns in table order; arrows say which way is better
QUALITY = (("fid", "FID ↓", 3), ("kid", "KID ↓", 4), ("clip_score", "CLIP score ↑", 2),
           ("temporal_consistency", "temporal consistency ↑", 3), ("motion", "motion", 4))


def metric_table(results: dict[str, dict[str, dict]], prompt_set: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per model) of every score `results[model][prompt_set]` holds: rewards, quality, oracle."""
    first = next(iter(results.values()))[prompt_set]
    columns = [(k, f"{k.removeprefix('reward/')} ↑", 4) for k in first if k.startswith("reward/")]
    if len(columns) > 1:
        columns.insert(0, ("reward", "reward (weighted sum) ↑", 4))
    columns += [c for c in QUALITY if c[0] in first]
    columns += [(k, f"{k.replace('_accuracy', '')} acc. ↑", 3) for k in ORACLE_COLUMNS if k in first]
    rows = [[name, *(f"{sets[prompt_set][k]:.{d}f}" for k, _, d in columns)] for name, sets in results.items()]
    return ["model", *(h for _, h, _ in columns)], rows


def wrap(text: str, font, width: int, lines: int = 4) -> list[str]:
    """`text` broken at spaces into at most `lines` lines of at most `width` px; what does not fit ends in '...'."""
    words, out = text.removeprefix("a ").split(), []
    while words and len(out) < lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line += " " + words.pop(0)
        out.append(line)
    if words:
        last = out[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        out[-1] = last.rstrip() + "..."
    return out


def tile(rows: list[list[np.ndarray]], labels: list[str], columns: list[str], cell: int = CELL) -> np.ndarray:
    """Rows of (F, H, W, 3) clips -> one (F, H', W', 3) video: each clip resized to `cell` px, its row's label on
    the left, its column's label (a prompt, wrapped to the cell's width) on top."""
    font = ImageFont.load_default()
    gap, label_w = 4, max(round(font.getlength(label)) for label in labels) + 8
    heads = [wrap(text, font, cell) for text in columns]
    line_h = font.getbbox("Ag")[3] + 2
    top = max(map(len, heads), default=0) * line_h + 2 * gap
    frames = max(len(c) for row in rows for c in row)
    width = max(len(row) for row in rows)
    canvas = Image.new("RGB", (label_w + width * (cell + gap), top + len(rows) * (cell + gap)), (235, 235, 235))
    draw = ImageDraw.Draw(canvas)
    for j, head in enumerate(heads[:width]):
        for k, line in enumerate(head):
            draw.text((label_w + j * (cell + gap), gap + k * line_h), line, fill=(0, 0, 0), font=font)
    for i, label in enumerate(labels):
        draw.text((gap, top + i * (cell + gap) + cell // 2 - 6), label, fill=(0, 0, 0), font=font)
    video = np.repeat(np.asarray(canvas)[None], frames, axis=0)
    for i, row in enumerate(rows):
        for j, clip in enumerate(row):
            y, x = top + i * (cell + gap), label_w + j * (cell + gap)
            for f in range(frames):
                frame = Image.fromarray(clip[min(f, len(clip) - 1)]).resize((cell, cell), Image.Resampling.NEAREST)
                video[f, y : y + cell, x : x + cell] = np.asarray(frame)
    return video


def sample_grids(samples: Path, names: list[str], prompt_set: str, prompts: list[str], out: Path,
                 fps: int) -> list[str]:
    """`grid_<set>.gif` (rows: models, columns: `prompts`, the set's first few, labelled on top) and `grid_<set>.png`,
    its middle frame; returns the two file names."""
    rows = [[decode_video(path.read_bytes()) for path in sorted((samples / name / prompt_set).glob("*.mp4"))]
            [: len(prompts)] for name in names]
    video = tile(rows, names, prompts)
    gif, png = f"grid_{prompt_set}.gif", f"grid_{prompt_set}.png"
    write_video(out / gif, video, fps=fps)
    buffer = io.BytesIO()
    Image.fromarray(video[len(video) // 2]).save(buffer, format="PNG")
    write_atomically(out / png, buffer.getvalue())
    return [gif, png]


def lineage_of(export: Path) -> dict:
    """An export's lineage.json ({} without one)."""
    lineage = export / LINEAGE_FILE
    return json.loads(lineage.read_text()) if lineage.is_file() else {}


def run_dir_of(lineage: dict) -> Path | None:
    """The run directory an export was trained in (its lineage's `run_dir`), if it still exists."""
    run_dir = lineage.get("run_dir")
    return Path(run_dir) if run_dir and Path(run_dir).is_dir() else None


def read_curves(run_dir: Path | None, columns: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{column: [(step, value)]} of a run's metrics.csv, for the `columns` it logged."""
    path = run_dir / "metrics.csv" if run_dir else None
    if path is None or not path.is_file():
        return {}
    curves: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for column in columns:
                if row.get(column) and row.get("step"):
                    curves.setdefault(column, []).append((int(row["step"]), float(row[column])))
    return curves


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> list[str]:
    """One PNG per column, a line per model: {model: {column: points}} -> the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(c for per_model in curves.values() for c in per_model))
    files = []
    for column in columns:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for name, per_model in curves.items():
            if column in per_model:
                steps, values = zip(*per_model[column])
                ax.plot(steps, values, label=name, lw=1.5, marker="o" if len(steps) < 20 else None, ms=3)
        ax.set_xlabel("training step (of that stage)")
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"curve_{column.replace('/', '_')}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def render(blocks: list[tuple], fmt: str) -> str:
    """Blocks ("h1"|"h2"|"p", text), ("table", header, rows), ("images", [(file, caption)]) as markdown or HTML."""
    out = []
    for kind, *args in blocks:
        if fmt == "md":
            if kind in ("h1", "h2"):
                out.append(f"{'#' * int(kind[1])} {args[0]}\n")
            elif kind == "p":
                out.append(args[0] + "\n")
            elif kind == "table":
                header, rows = args
                out.append("\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
                                      *("| " + " | ".join(r) + " |" for r in rows)]) + "\n")
            else:
                out.append("\n".join(f"![{caption}]({file})" for file, caption in args[0]) + "\n")
        else:
            if kind in ("h1", "h2", "p"):
                out.append(f"<{kind}>{html.escape(args[0])}</{kind}>")
            elif kind == "table":
                header, rows = args
                cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                out.append(f"<table><tr>{cells}</tr>{body}</table>")
            else:
                out.append("".join(f'<figure><img src="{html.escape(file)}" alt="{html.escape(caption)}">'
                                   f"<figcaption>{html.escape(caption)}</figcaption></figure>" for file, caption in args[0]))
    if fmt == "md":
        return "\n".join(out)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "figure{display:inline-block;margin:8px}img{max-width:100%;image-rendering:pixelated}")
    return f"<!doctype html><meta charset=utf-8><title>evaluation</title><style>{style}</style>\n" + "\n".join(out)


def write_report(out: Path, results: dict[str, dict[str, dict]], exports: dict[str, Path],
                 prompt_sets: dict[str, list[str]], samples: Path, grid_prompts: int, curve_columns: list[str],
                 fps: int) -> str:
    """report.md and report.html in `out`: per prompt set a metric table and sample grids, then the models'
    training curves; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(results)
    lineage = {name: lineage_of(exports[name]) for name in names}
    runs = {name: run_dir_of(lineage[name]) for name in names}
    blocks = [("h1", "Evaluation"), ("table", ["model", "export", "stage", "step"],
                                     [[n, str(exports[n]), str(lineage[n].get("stage", "")),
                                       str(lineage[n].get("step", ""))] for n in names])]
    for prompt_set, prompts in prompt_sets.items():
        blocks += [("h2", f"{prompt_set} prompts ({len(prompts)})"), ("table", *metric_table(results, prompt_set))]
        gif, png = sample_grids(samples, names, prompt_set, prompts[:grid_prompts], out, fps)
        blocks += [("images", [(gif, f"{prompt_set}: rows are models, columns the first {grid_prompts} prompts"),
                               (png, f"{prompt_set}: middle frame")]),
                   ("p", "Prompts: " + "; ".join(f"{i}: {p}" for i, p in enumerate(prompts[:grid_prompts])))]
    curves = {name: read_curves(runs[name], curve_columns) for name in names}
    files = plot_curves(curves, out)
    if files:
        blocks += [("h2", "Training curves (each run's metrics.csv)"), ("images", [(f, f) for f in files])]
    missing = [n for n in names if runs[n] is None]
    if missing:
        blocks.append(("p", f"No training logs found for {', '.join(missing)} (no lineage.json run_dir on disk)."))
    text = render(blocks, "md")
    write_atomically(out / "report.md", text.encode())
    write_atomically(out / "report.html", render(blocks, "html").encode())
    return text

