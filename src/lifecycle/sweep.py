"""A Hydra multirun as one table: `python -m lifecycle.sweep <multirun dir> [--sort KEY] [--desc] [--keys K ...]`.

Each job folder `<dir>/<num>/` holds `.hydra/overrides.yaml` and, once the job has finished, the `result.json`
that `python -m lifecycle` writes. One row per job: its number, its status, the overrides that vary between
jobs, then the numbers of its result (nested keys joined with `/`, e.g. `after/test/reward`). `--keys` takes
globs matched against whole result keys (`*` spans `/`: `'*/reward'` is every reward; a plain key is only
itself). `--sort` orders by a result key, an override key or `job`; jobs without that key go last. Jobs
without result.json (failed, or still running) are rows of their own and counted under the table. The table
is printed and written to `<dir>/summary.md`, with full-precision values in `<dir>/summary.csv`.
"""

import argparse
import csv
import json
from fnmatch import fnmatchcase
from pathlib import Path

import yaml

DONE, FAILED = "done", "failed/unfinished"


def flatten(node, prefix: str = "") -> dict:
    """The numbers (ints and floats, not bools) in nested dicts, keyed by their path joined with `/`."""
    out = {}
    for key, value in (node.items() if isinstance(node, dict) else ()):
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def read_job(folder: Path) -> dict:
    """A job folder as {job, status, overrides: {key: value as typed}, result: flattened result.json}."""
    listed = folder / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(listed.read_text()) if listed.is_file() else None) or []
    result = folder / "result.json"
    return {"job": folder.name, "status": DONE if result.is_file() else FAILED,
            "overrides": dict(o.split("=", 1) for o in overrides if "=" in o),
            "result": flatten(json.loads(result.read_text())) if result.is_file() else {}}


def read_jobs(sweep_dir: Path) -> list[dict]:
    """Every job folder (`<num>/.hydra/`) of a multirun directory, in job-number order."""
    if not sweep_dir.is_dir():
        raise SystemExit(f"{sweep_dir}: no such directory")
    folders = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
    if not folders:
        raise SystemExit(f"{sweep_dir}: no job folders (<num>/.hydra/); is it a multirun's hydra.sweep.dir?")
    return [read_job(p) for p in sorted(folders, key=lambda p: (not p.name.isdigit(), p.name.zfill(9)))]


def varying(overrides: list[dict]) -> list[str]:
    """The override keys whose value differs between jobs (or that some jobs lack), first seen first."""
    keys = dict.fromkeys(k for o in overrides for k in o)
    return [k for k in keys if len({o.get(k) for o in overrides}) > 1]


def columns(results: list[dict], keys: list[str] | None = None) -> list[str]:
    """The result columns: every key any job has, first seen first; with `keys`, those matching each glob in turn."""
    known = list(dict.fromkeys(k for r in results for k in r))
    if keys is None:
        return known
    chosen = []
    for pattern in keys:
        matched = [k for k in known if fnmatchcase(k, pattern)]
        if known and not matched:
            raise SystemExit(f"--keys {pattern}: matches no result key; known: {', '.join(known)}")
        chosen += matched
    return list(dict.fromkeys(chosen))


def sort_jobs(jobs: list[dict], key: str, desc: bool = False) -> list[dict]:
    """The jobs ordered by `key` (`job`, a result key or an override key, values compared as numbers where
    they parse), jobs without it last."""
    def value(job):
        return job["job"] if key == "job" else job["result"].get(key, job["overrides"].get(key))

    def order(job):
        try:
            return 0, float(value(job))
        except ValueError:
            return 1, str(value(job))

    present = [j for j in jobs if value(j) is not None]
    if not present and any(j["result"] for j in jobs):
        known = dict.fromkeys(k for j in jobs for k in (*j["overrides"], *j["result"]))
        raise SystemExit(f"--sort {key}: no job has this key; known: job, {', '.join(known)}")
    return sorted(present, key=order, reverse=desc) + [j for j in jobs if value(j) is None]


def summarise(jobs: list[dict], sort: str = "job", desc: bool = False, keys: list[str] | None = None):
    """The table's header and rows: job, status, the varying overrides, the result columns (None where missing)."""
    vary = varying([j["overrides"] for j in jobs])
    results = columns([j["result"] for j in jobs], keys)
    header = ["job", "status", *vary, *results]
    rows = [[j["job"], j["status"], *(j["overrides"].get(k) for k in vary), *(j["result"].get(k) for k in results)]
            for j in sort_jobs(jobs, sort, desc)]
    return header, rows


def cell(value) -> str:
    """A markdown cell: floats to 4 significant digits (whole numbers from 10^4 up), `-` where missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value).replace("|", r"\|")


def markdown(header: list[str], rows: list[list]) -> str:
    """A padded markdown table, columns of numbers right-aligned."""
    cells = [header, *([cell(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = [any(row[i] is not None for row in rows)
             and all(row[i] is None or isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in cells[1:])])


def footer(jobs: list[dict]) -> str:
    """The count of jobs, and of those without result.json."""
    failed = [j["job"] for j in jobs if j["status"] != DONE]
    text = f"{len(jobs)} jobs, {len(jobs) - len(failed)} {DONE}"
    return text + (f", {len(failed)} {FAILED} (no result.json; see each job's *.log): {', '.join(failed)}"
                   if failed else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lifecycle.sweep",
                                     description="A Hydra multirun's jobs and results as one markdown table.")
    parser.add_argument("dir", type=Path, help="the multirun directory (hydra.sweep.dir), e.g. multirun/vader/<time>")
    parser.add_argument("--sort", default="job", metavar="KEY", help="order by a result or override key (default: job)")
    parser.add_argument("--desc", action="store_true", help="largest first")
    parser.add_argument("--keys", nargs="+", metavar="K",
                        help="result columns to show: globs over whole keys, `*` spans `/` (default: all)")
    args = parser.parse_args(argv)
    jobs = read_jobs(args.dir)
    header, rows = summarise(jobs, args.sort, args.desc, args.keys)
    text = f"{markdown(header, rows)}\n\n{footer(jobs)}\n"
    print(text, end="")
    (args.dir / "summary.md").write_text(text)
    with open(args.dir / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *([("" if v is None else v) for v in row] for row in rows)])


if __name__ == "__main__":
    main()
