"""simulations/queries_plot.py: the accuracy-versus-queries comparison averages each method's seeds per round (mean
cumulative queries, accuracy with its 95% CI), names the methods that have not finished, and refuses methods
scored on different test examples."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("queries_plot", REPO / "simulations" / "queries_plot.py")
queries_plot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(queries_plot)


def write_seed(folder: Path, seed: int, curve: list[tuple[int, float]], eval_ids: str = "same",
               reference: float = 0.4) -> None:
    """A finished run folder as `fedprompt run` leaves it, with only the keys the plot reads."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed: {seed}\ntask: trec\n")
    (folder / "rounds.json").write_text(json.dumps(
        [{"round": i, "queries": q, "accuracy": a} for i, (q, a) in enumerate(curve)]))
    (folder / "summary.json").write_text(json.dumps({
        "task": "trec", "eval_split": "test", "eval_n": 4, "eval_ids_sha256": eval_ids, "final_accuracy": curve[-1][1],
        "reference_kind": "zero-shot", "reference_accuracy": reference, "queries_per_client_round": 290.0}))
    (folder / "result.json").write_text(json.dumps({"wall_s": 1.0}))


def test_seeds_are_averaged_per_round_and_unfinished_methods_are_named(tmp_path, capsys):
    for seed, (a1, a2) in enumerate([(0.30, 0.40), (0.32, 0.44), (0.34, 0.48)]):
        write_seed(tmp_path / "feddtpt_trec_frozen" / str(seed), seed, [(0, 0.2), (2800 + seed, a1), (2800, a2)])
    write_seed(tmp_path / "bdpl_trec" / "0", 0, [(0, 0.2), (3000, 0.25), (3000, 0.3)])
    (tmp_path / "fedavg_bbt_trec" / "0").mkdir(parents=True)  # started, never finished: no summary.json

    out = queries_plot.main(["--task", "trec", "--results", str(tmp_path)])

    feddtpt = out["methods"]["FedDTPT (paper's server)"]
    assert feddtpt["seeds"] == [0, 1, 2]
    assert [p["queries"] for p in feddtpt["points"]] == [0, 2801, 5601]  # cumulative, averaged over seeds
    final = feddtpt["points"][-1]["accuracy"]
    assert final["mean"] == pytest.approx(0.44) and final["ci95"][0] < 0.44 < final["ci95"][1]
    assert out["methods"]["BDPL-FedAvg"]["points"][-1]["accuracy"]["ci95"] is None  # one seed: no interval
    assert {Path(m).name for m in out["missing"]} == {"feddtpt_trec_agreement", "fedavg_bbt_trec"}
    assert (tmp_path / "queries_trec.png").stat().st_size > 1000
    assert json.loads((tmp_path / "queries_trec.json").read_text())["methods"].keys() == out["methods"].keys()
    assert "not finished (left out)" in capsys.readouterr().out


def test_methods_scored_on_different_examples_are_refused(tmp_path):
    write_seed(tmp_path / "feddtpt_trec_frozen" / "0", 0, [(0, 0.2), (100, 0.3)], eval_ids="first 500")
    write_seed(tmp_path / "bdpl_trec" / "0", 0, [(0, 0.2), (100, 0.3)], eval_ids="another 500")
    with pytest.raises(SystemExit, match="different test examples"):
        queries_plot.main(["--task", "trec", "--results", str(tmp_path)])


def test_no_finished_method_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit, match="run the commands"):
        queries_plot.main(["--task", "trec", "--results", str(tmp_path)])


def test_methods_with_different_references_are_refused(tmp_path):
    write_seed(tmp_path / "feddtpt_trec_frozen" / "0", 0, [(0, 0.2), (100, 0.3)])
    write_seed(tmp_path / "bdpl_trec" / "0", 0, [(0, 0.2), (100, 0.3)], reference=0.41)  # another model or precision
    with pytest.raises(SystemExit, match="different references"):
        queries_plot.main(["--task", "trec", "--results", str(tmp_path)])
