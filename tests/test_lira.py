"""LiRA (fedprompt.privacy.lira) on synthetic confidences, and simulations/lira.py end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from fedprompt.errors import ConfigError
from fedprompt.privacy import lira
from fedprompt.privacy.lira import balanced_halves, evaluate_attack, logit_confidence, online_scores, tpr_at_fpr
from tests.conftest import write_task

ROOT = Path(__file__).resolve().parents[1]


def test_every_example_is_in_exactly_half_of_the_shadows():
    members = balanced_halves(8, 50, seed=3)
    assert members.shape == (8, 50) and (members.sum(0) == 4).all()
    assert not (members == balanced_halves(8, 50, seed=4)).all()  # the seed matters
    assert 15 < members.sum(1).mean() < 35  # each shadow holds about half the pool
    for bad in (3, 5, 2):
        with pytest.raises(ConfigError, match="even number of shadows"):
            balanced_halves(bad, 50, 0)


def test_logit_confidence_is_log_odds_of_the_true_label():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [-3.0, 4.0, 1.0]])
    labels = np.array([0, 2, 1])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    py = p[np.arange(3), labels]
    np.testing.assert_allclose(logit_confidence(logits, labels), np.log(py / (1 - py)), rtol=1e-12)
    # stable where a naive 1 - p underflows to 0
    assert np.isfinite(logit_confidence(np.array([[60.0, -60.0]]), np.array([0])))[0]


def synthetic(shift: float, shadows: int = 16, n: int = 400, seed: int = 0):
    """phi = a per-example difficulty + shift if a member + noise: the case the online test is built for."""
    rng = np.random.default_rng(seed)
    members = balanced_halves(shadows, n, seed)
    difficulty = rng.normal(0, 3, n)
    phi = difficulty + shift * members + rng.normal(0, 1, (shadows, n))
    return phi, members


def test_the_attack_finds_members_when_training_shifts_their_confidence():
    phi, members = synthetic(shift=1.5)
    result = evaluate_attack(phi, members, reps=200)
    assert result.auc > 0.8 and result.auc_ci95[0] > 0.75 and result.tpr_at_1pct_fpr > 0.05
    assert result.pairs == phi.size
    # the per-example calibration is the point of LiRA: one global threshold on phi does much worse
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(members.ravel(), phi.ravel()) < result.auc - 0.15


def test_the_attack_is_at_chance_when_membership_changes_nothing():
    phi, members = synthetic(shift=0.0)
    result = evaluate_attack(phi, members, reps=200)
    assert result.auc_ci95[0] < 0.5 < result.auc_ci95[1] and abs(result.auc - 0.5) < 0.04
    assert result.tpr_at_1pct_fpr < 0.05


def test_per_example_variance_also_works_and_a_constant_shadow_set_does_not_divide_by_zero():
    phi, members = synthetic(shift=1.5)
    assert evaluate_attack(phi, members, fixed_variance=False, reps=50).auc > 0.75
    scores = online_scores(np.zeros((4, 6)), balanced_halves(4, 6, 0))
    assert np.isfinite(scores).all()


def test_pools_put_their_pairs_in_one_roc_and_narrow_the_interval():
    pools = [synthetic(shift=0.7, shadows=8, n=64, seed=k) for k in range(4)]
    alone = evaluate_attack(*pools[0], reps=300)
    pooled = lira.evaluate_pools([p[0] for p in pools], [p[1] for p in pools], reps=300)
    assert pooled.pairs == 4 * 8 * 64 and len(pooled.pool_aucs) == 4 and pooled.pool_aucs[0] == alone.auc
    assert min(pooled.pool_aucs) <= pooled.auc <= max(pooled.pool_aucs)
    width = lambda r: r.auc_ci95[1] - r.auc_ci95[0]  # noqa: E731
    assert width(pooled) < 0.75 * width(alone)  # 4x the examples: about half the width
    assert pooled.auc_ci95[0] > 0.5
    # a single pool is exactly the one-pool attack
    assert lira.evaluate_pools([pools[0][0]], [pools[0][1]], reps=300).auc_ci95 == alone.auc_ci95
    with pytest.raises(ConfigError, match="same number of shadows"):
        lira.evaluate_pools([pools[0][0], np.zeros((4, 10))], [pools[0][1], balanced_halves(4, 10, 0)])
    with pytest.raises(ConfigError, match="one membership matrix per pool"):
        lira.evaluate_pools([pools[0][0]], [])


def test_tpr_at_fpr_reads_the_roc_below_the_bound():
    truth = np.array([0] * 100 + [1] * 100)
    scores = np.r_[np.arange(100), np.arange(100) + 98.5]  # one negative (99) above the lowest positive
    assert tpr_at_fpr(truth, scores, 0.01) == 1.0
    assert tpr_at_fpr(truth, scores, 0.0) == pytest.approx(0.99)


def test_shapes_are_checked():
    with pytest.raises(ConfigError, match="shadows, examples"):
        online_scores(np.zeros((4, 5)), np.zeros((4, 6), bool))
    with pytest.raises(ConfigError, match="examples, classes"):
        logit_confidence(np.zeros(3), np.zeros(3))


def load_script():
    spec = importlib.util.spec_from_file_location("lira_script", ROOT / "simulations" / "lira.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_writes_the_result_and_resumes(tiny_model_dir, tmp_path):
    words = ["a great movie", "a terrible film", "wonderful cast", "boring and too long"]
    rows = {s: [{"text": f"{words[i % 4]} {s}{i}", "label": (i % 4) % 2} for i in range(24)]
            for s in ("train", "validation", "test")}
    write_task(tmp_path / "data", "toy", rows, ["negative", "positive"])
    script = load_script()
    argv = ["--task", "toy", "--model", str(tiny_model_dir), "--pool", "16", "--shadows", "4", "--steps", "3",
            "--batch-size", "4", "--prompt-tokens", "2", "--epsilons", "inf", "8", "--overfit-steps", "4",
            "--bootstrap", "20", "--out", str(tmp_path / "out"),
            "--set", f"data_dir={tmp_path / 'data'}", "--set", "model.dtype=float32", "--set", "model.device=cpu"]
    record = script.main(argv)
    saved = json.loads((tmp_path / "out" / "lira_toy.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert set(saved["auc"]) == {"inf", "8", "inf_overfit"} and saved["shadows"] == saved["targets"] == 4
    assert all(0 <= v <= 1 for v in saved["auc"].values()) and saved["pairs"]["inf"] == 4 * 16
    assert saved["epsilon_reached_max"]["8"] <= 8.0 + 1e-6 and saved["epsilon_reached_max"]["inf"] == float("inf")
    assert (tmp_path / "out" / "lira_toy_roc.png").stat().st_size > 0
    # resumed: every shadow is read back, none retrained, same numbers
    script_again = load_script()
    work = tmp_path / "out" / "lira_toy_work"
    mtimes = {p: p.stat().st_mtime_ns for p in work.rglob("*.npz")}
    assert len(mtimes) == 3 * 4 and script_again.main(argv)["auc"] == record["auc"]
    assert mtimes == {p: p.stat().st_mtime_ns for p in work.rglob("*.npz")}
    # a second pool: seed 0's shadows are read back, seed 1's trained; both pools' pairs in one ROC
    pooled = load_script().main([*argv, "--seed", "0", "1", "--epsilons", "inf", "--overfit-steps", "0"])
    assert mtimes == {p: p.stat().st_mtime_ns for p in (work / "seed_0").rglob("*.npz")}
    assert len(list((work / "seed_1").glob("*.npz"))) == 4
    assert pooled["pairs"]["inf"] == 2 * 4 * 16 and pooled["targets"] == 8 and pooled["seeds"] == [0, 1]
    assert pooled["auc_per_pool"]["inf"][0] == record["auc"]["inf"] and len(pooled["auc_per_pool"]["inf"]) == 2


def test_the_script_refuses_bad_arguments_before_loading_anything(capsys):
    script = load_script()
    for argv, message in ((["--shadows", "5"], "even"), (["--epsilons", "0"], "number > 0"),
                          (["--pool", "8", "--batch-size", "8"], "Poisson rate"), (["--seed", "1", "1"], "own seed")):
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert message in capsys.readouterr().err
