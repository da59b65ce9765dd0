"""The near-duplicate search at scale: a synthetic set of embeddings with planted near copies, deduplicated
through each faiss index the curate stage can use, with time, memory and recall against exact search.

    python -m lifecycle.bench.dedup [--n 1000000] [--dim 512] [--index ivf hnsw] [--sample 1000] [--out DIR]

The vectors: `n` points around 1000 random centres (CLIP-like clusters; neighbours ~0.3 RMS apart), the last
`copies` of them near copies (RMS distance ~0.01) of random earlier ones, at threshold 0.02. Per index: build
and search seconds over the whole set (what `stage=curate` does), the index's memory (resident-set growth),
planted copies caught, and on `sample` random clips, recall against exact (flat) search: of the nearest neighbour
and of the pairs within the threshold. Writes `<out>/dedup.md` and `dedup.json`.
"""

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np
import psutil

from ..curation.dedup import build_index, search_pairs

THRESHOLD = 0.02


def synthetic(n: int, dim: int, copies: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32: clustered points, the last `copies` rows near copies of earlier ones."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    emb = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        emb[s:s + m] = centres[rng.integers(0, len(centres), m)] + rng.normal(scale=0.3, size=(m, dim))
    originals = rng.choice(n - copies, copies, replace=False)
    emb[n - copies:] = emb[originals] + rng.normal(scale=0.01, size=(copies, dim))
    return emb


def exact_neighbours(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    flat = faiss.IndexFlatL2(emb.shape[1])
    flat.add(emb)
    return flat.search(emb[queries], k)


def bench(emb: np.ndarray, kind: str, copies: int, sample: np.ndarray, exact, neighbours: int, **args) -> dict:
    rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    index = build_index(emb, index=kind, exact_up_to=0, **args)
    built = time.perf_counter() - start
    memory = psutil.Process().memory_info().rss - rss
    start = time.perf_counter()
    pairs = search_pairs(index, emb, THRESHOLD, neighbours)
    searched = time.perf_counter() - start
    n, k = len(emb), neighbours + 1
    caught = sum(i in pairs for i in range(n - copies, n))
    dist, idx = index.search(emb[sample], k)
    exact_dist, exact_idx = exact
    scale = emb.shape[1]

    def within(d, j, q):  # neighbours other than the clip itself within the threshold
        return {int(b) for a, b in zip(d, j) if b >= 0 and b != q and np.sqrt(max(a, 0) / scale) <= THRESHOLD}

    truth = [within(d, j, q) for d, j, q in zip(exact_dist, exact_idx, sample)]
    found = [within(d, j, q) for d, j, q in zip(dist, idx, sample)]
    nearest = [[b for b in row if b != q][:1] for row, q in zip(idx, sample)]
    exact_nearest = [[b for b in row if b != q][:1] for row, q in zip(exact_idx, sample)]
    return {"index": kind, "vectors": n, "dim": emb.shape[1], "build_s": built, "search_s": searched,
            "memory_mb": memory / 2**20, "planted": copies, "caught": caught,
            "recall_at_1": float(np.mean([a == b for a, b in zip(nearest, exact_nearest)])),
            "pair_recall": sum(len(t & f) for t, f in zip(truth, found)) / max(sum(map(len, truth)), 1),
            "sample_pairs": sum(map(len, truth))}


def table(rows: list[dict], threads: int) -> str:
    lines = [f"Near-duplicate search, {rows[0]['vectors']:,} vectors of {rows[0]['dim']} dims (float32), "
             f"{threads} threads; recall against exact search on a sample.", "",
             "| index | build s | search s (all clips) | memory MB | planted copies caught | recall@1 | pair recall |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['index']} | {r['build_s']:.1f} | {r['search_s']:.1f} | {r['memory_mb']:.0f} | "
                     f"{r['caught']} of {r['planted']} | {r['recall_at_1']:.3f} | {r['pair_recall']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--copies", type=float, default=0.01, help="share of the vectors that are near copies")
    parser.add_argument("--index", nargs="+", default=["ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument("--neighbours", type=int, default=16)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--threads", type=int, default=faiss.omp_get_max_threads())
    parser.add_argument("--out", default="outputs/bench-dedup")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    copies = int(args.n * args.copies)
    emb = synthetic(args.n, args.dim, copies)
    sample = np.random.default_rng(1).choice(args.n, min(args.sample, args.n), replace=False)
    start = time.perf_counter()
    exact = exact_neighbours(emb, sample, args.neighbours + 1)
    print(f"exact search of {len(sample)} sampled clips: {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for kind in args.index:
        rows.append(bench(emb, kind, copies, sample, exact, args.neighbours, nprobe=args.nprobe,
                          ef_search=args.ef_search))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dedup.json").write_text(json.dumps(rows, indent=1))
    (out / "dedup.md").write_text(table(rows, args.threads))
    print(table(rows, args.threads))
    return rows


if __name__ == "__main__":
    main()
