"""The few lines a run ends with: one row per stage (seconds, its headline figure) and where its report is.

The whole result stays in `result.json` (and a recipe's `recipe.json`); this is what a person reads first.
"""

from pathlib import Path


def _pct(value: float) -> str:
    return f"{value:.0%}"


def headline(result: dict) -> str:
    """The figure a stage's result is about, read from the keys it holds (any stage, no list to keep)."""
    r = result
    if "kept" in r and "inputs" in r:
        return f"{r['kept']}/{r['inputs']} clips kept in {r.get('shards', '?')} shards"
    if "pairs" in r:
        return f"{r['pairs']} preference pairs ({r.get('ties', 0)} ties dropped)"
    if "after/accuracy" in r:
        return f"held-out pair accuracy {_pct(r['before/accuracy'])} -> {_pct(r['after/accuracy'])}"
    if "after/test/reward" in r:
        return (f"held-out reward {r['before/test/reward']:.4f} -> {r['after/test/reward']:.4f} "
                f"(training prompts {r['before/train/reward']:.4f} -> {r['after/train/reward']:.4f})")
    models = {name: sets for name, sets in r.items() if isinstance(sets, dict) and "test" in sets}
    if models:  # stage=eval: every model's scores
        best = max(models, key=lambda name: models[name]["test"].get("reward", float("-inf")))
        return f"{len(models)} models compared; best held-out reward: {best} ({models[best]['test']['reward']:.4f})"
    parts = [f"{r['steps']} steps"] if "steps" in r else []
    if "fid" in r:
        parts.append(f"FID {r['fid']:.3f}")
    parts += [f"{key.split('_')[0]} {_pct(r[key])}" for key in ("colour_accuracy", "direction_accuracy") if key in r]
    return ", ".join(parts)


def seconds(result: dict) -> float | None:
    """A result's `seconds`: a number, or per-step seconds (stage=curate run alone) added up."""
    value = result.get("seconds")
    if isinstance(value, dict):
        value = sum(v for v in value.values() if isinstance(v, (int, float)))
    return value if isinstance(value, (int, float)) else None


def table(rows: list[tuple[str, float | None, str]]) -> str:
    """Aligned plain-text columns: stage, seconds, headline."""
    width = max(len("stage"), *(len(name) for name, _, _ in rows))
    lines = [f"{'stage':<{width}}  {'seconds':>7}  result"]
    lines += [f"{name:<{width}}  {'' if s is None else f'{s:.0f}':>7}  {text}" for name, s, text in rows]
    return "\n".join(lines)


def summary(result: dict, run_dir: Path, name: str) -> str:
    """The table of a stage's or a recipe's (`stages` in `result`) result, and the evaluation reports it left."""
    stages = result.get("stages", {name: result})
    rows = [(stage, seconds(r), headline(r)) for stage, r in stages.items()]
    root = Path(run_dir)
    reports = [d / "report" / "report.md" for d in ((root / s) if "stages" in result else root for s in stages)]
    lines = [table(rows), *(f"report: {path}" for path in reports if path.is_file())]
    if "stages" in result:
        lines.append(f"all results: {root / 'recipe.json'}")
    else:
        lines.append(f"all results: {root / 'result.json'}")
    return "\n".join(lines)
