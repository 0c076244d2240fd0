"""What FedDTPT's server (the paper's DBSCAN at the knee eps) does with the prompts clients really sent.

    python simulations/diagnostics/feddtpt_clusters.py RUN_FOLDER [RUN_FOLDER ...] [--set KEY=VALUE ...] [--out FILE]

Replays every round's aggregation from a run folder's rounds.json (the clients' prompts as received) with the
run's own ``method.aggregate`` settings (config.yaml), and lists, per round, the eps the knee chose and every
cluster that holds more than one distinct word, with each word's count: the words DBSCAN merges into one, of
which one survives. Also prints the embedder's cosine distance for a fixed list of word pairs (synonyms,
antonyms, function words), which shows what any single eps can and cannot separate. ``--set`` changes a
``method.aggregate`` key for the replay (e.g. ``--set cannot_link=true``): what that server would have merged
from the same replies (the clients' later rounds would differ, so only round 1 is a like-for-like comparison). No black-box call; the
embedder only (seconds on a CPU). Writes the JSON to --out (default:
simulations/results/diagnostics/feddtpt_clusters.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from fedprompt.methods.feddtpt.aggregate import FedDTPTAggregator
from fedprompt.methods.feddtpt.config import AggregateConfig

PAIRS = [("film", "movie"), ("great", "good"), ("type", "kind"), ("location", "place"), ("positive", "negative"),
         ("great", "terrible"), ("What", "this"), ("What", "question"), ("of", "for:"), ("the", "a"),
         ("negative", "negative?"), ("entity,", "entity")]


def replay(folder: Path, changes: dict) -> dict:
    settings = {**yaml.safe_load((folder / "config.yaml").read_text())["method"]["aggregate"], **changes}
    aggregator = FedDTPTAggregator(AggregateConfig(**settings))
    rounds = []
    for row in json.loads((folder / "rounds.json").read_text())[1:]:
        prompts = sorted((p.split() for p in row.get("client_prompts") or []), key=" ".join)
        if not prompts:
            continue
        result = aggregator.aggregate(prompts)
        members: dict[int, dict[str, int]] = {}
        for prompt, labels in zip(prompts, result.labels):
            for word, label in zip(prompt, labels):
                if label >= 0:
                    members.setdefault(int(label), {}).setdefault(word, 0)
                    members[int(label)][word] += 1
        merged = [dict(sorted(m.items(), key=lambda kv: -kv[1])) for m in members.values() if len(m) > 1]
        rounds.append({"round": row["round"], "eps": result.eps, "eps_floored": result.eps_floored,
                       "clusters": len(members), "merged_clusters": merged, "merged": " ".join(result.prompt),
                       "recorded": row.get("prompt")})
    return {"run": str(folder), "aggregate": settings, "rounds": rounds}


def pair_distances(embedder) -> list[dict]:
    words = sorted({w for pair in PAIRS for w in pair})
    x = np.asarray(embedder.encode(words), dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    at = {w: i for i, w in enumerate(words)}
    return [{"a": a, "b": b, "cosine_distance": round(1.0 - float(x[at[a]] @ x[at[b]]), 3)} for a, b in PAIRS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a method.aggregate key for the replay (YAML value)")
    parser.add_argument("--out", type=Path, default=Path("simulations/results/diagnostics/feddtpt_clusters.json"))
    args = parser.parse_args()
    changes = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    runs = [replay(folder, changes) for folder in args.runs]
    distances = pair_distances(FedDTPTAggregator(AggregateConfig()).embedder)
    for run in runs:
        print(run["run"])
        for r in run["rounds"]:
            print(f"  round {r['round']}: eps {r['eps']:.3f}{' (floored)' if r['eps_floored'] else ''}, "
                  f"{r['clusters']} clusters -> {r['merged']!r}")
            for cluster in r["merged_clusters"]:
                print(f"    one cluster: {cluster}")
    print("cosine distance between single words (the embedder of method.aggregate.embedder):")
    for d in distances:
        print(f"  {d['a']:>10} / {d['b']:<10} {d['cosine_distance']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "pair_distances": distances}, indent=1) + "\n")


if __name__ == "__main__":
    main()
