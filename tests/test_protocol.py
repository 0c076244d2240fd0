"""The result protocol's pieces: the statistics on constructed cases with known answers, the content leak check
(before any model loads), the seeded evaluation subset, and the reference chosen on validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedprompt import cli
from fedprompt.config import compose
from fedprompt.data import Example, load_task
from fedprompt.data.leakage import check_disjoint, content_ids, content_key
from fedprompt.errors import DataError
from fedprompt.runs.data import eval_examples, public_examples, reference_examples, training_examples
from fedprompt.runs.protocol import measure_references
from fedprompt.runs.report import RunReport
from fedprompt.stats import paired_bootstrap, seed_interval
from tests.conftest import write_task
from tests.fl_support import tiny_overrides, write_secret_task


def test_seed_interval_is_student_t_and_undefined_for_one_seed():
    interval = seed_interval([0.80, 0.82, 0.84])
    assert interval.mean == pytest.approx(0.82)
    assert interval.ci95 == pytest.approx((0.82 - 4.3027 * 0.02 / 3 ** 0.5, 0.82 + 4.3027 * 0.02 / 3 ** 0.5), abs=1e-5)
    assert seed_interval([0.7]).ci95 is None and seed_interval([0.7]).to_dict() == {"mean": 0.7, "ci95": None}


def test_paired_bootstrap_on_constructed_prompts():
    n = 1000
    reference = np.zeros((3, n), dtype=bool)
    reference[:, :600] = True  # the reference is right on the first 600 examples, in every seed
    better = reference.copy()
    better[:, 600:700] = True  # the tuned prompt also gets the next 100 right: a gain of exactly 0.1
    gain = paired_bootstrap(better, reference, replicates=4000)
    assert gain.mean == pytest.approx(0.1)
    # per-example gains are 0/1 with p = 0.1: the bootstrap sd is sqrt(0.09 / 1000) = 0.0095
    assert gain.ci95[0] == pytest.approx(0.1 - 1.96 * 0.0095, abs=0.004)
    assert gain.ci95[1] == pytest.approx(0.1 + 1.96 * 0.0095, abs=0.004)
    assert gain.p_value == pytest.approx(2 / 4001)  # no replicate at or below 0: two-sided, add-one floor

    same = paired_bootstrap(reference, reference, replicates=500)
    assert same.mean == 0 and same.ci95 == (0, 0) and same.p_value == 1.0

    # Swapped errors: as many examples won as lost, so no gain; the interval straddles 0, p is large.
    swapped = reference.copy()
    swapped[:, :50] = False
    swapped[:, 600:650] = True
    tie = paired_bootstrap(swapped, reference, replicates=4000)
    assert tie.mean == 0 and tie.ci95[0] < 0 < tie.ci95[1] and tie.p_value > 0.5
    with pytest.raises(ValueError, match="share one non-empty"):
        paired_bootstrap(better[:, :10], reference)


def test_content_keys_ignore_case_spacing_and_unicode_form_but_not_the_pair():
    assert content_key(Example("A  great\tfilm .", 0)) == content_key(Example("a great film .", 1))
    assert content_key(Example("ｆｉｌｍ", 0)) == content_key(Example("film", 0))  # NFKC: full-width letters
    assert content_key(Example("a", 0, "b c")) != content_key(Example("a b", 0, "c"))
    assert content_ids([Example("x", 0), Example("X", 1)]).tolist()[0] == content_ids([Example("x", 0)])[0]
    with pytest.raises(DataError, match="the public pool: 1 of its 2 examples are also in the evaluation set"):
        check_disjoint({"the public pool": [Example("Seen.", 0), Example("new", 1)]}, "test split", [Example("seen.", 1)])


def _leaky_task(root):
    """Task 'leaky': its validation split repeats one test sentence (in other case and spacing)."""
    train = [{"text": f"train sentence {i}", "label": i % 2} for i in range(16)]
    test = [{"text": f"test sentence {i}", "label": i % 2} for i in range(8)]
    validation = [{"text": f"validation sentence {i}", "label": i % 2} for i in range(7)]
    validation.append({"text": "TEST  sentence 3", "label": 1})
    write_task(root, "leaky", {"train": train, "validation": validation, "test": test}, ["negative", "positive"])
    return root


def test_a_public_pool_holding_a_test_sentence_is_refused_before_any_model_loads(capsys, tmp_path, tiny_model_dir,
                                                                                nothing_expensive):
    args = [o.replace("task=secret", "task=leaky") for o in tiny_overrides(_leaky_task(tmp_path), tiny_model_dir)]
    code = cli.main(["run", *args, "federation.public_size=8"])  # the pool takes all of validation
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "the public pool (validation split): 1 of its 8 examples are also in the evaluation set" in err
    assert "(test split, 8 examples)" in err


def test_exclude_drops_the_overlap_from_every_learning_set(tmp_path):
    cfg = compose([f"data_dir={_leaky_task(tmp_path)}", "task=leaky", "federation.public_size=8",
                   "federation.eval_overlap=exclude", "partition.k_shot=null"])
    task = load_task(cfg.task, cfg.data_dir)
    spec = task.spec
    test_keys = {content_key(e) for e in eval_examples(cfg, task)}
    public, references = public_examples(cfg, task, spec), reference_examples(cfg, task)
    assert len(references) == 7 and not {content_key(e) for e in public + references} & test_keys
    assert len(training_examples(cfg, task, spec)) == 16


def test_stage_one_scores_on_validation_and_draws_the_public_pool_from_the_rest(tmp_path):
    data = write_secret_task(tmp_path)
    cfg = compose([f"data_dir={data}", "task=secret", "federation.eval_split=validation", "federation.eval_limit=5",
                   "federation.eval_sample_seed=3", "federation.public_size=2"])
    task = load_task(cfg.task, cfg.data_dir)
    evaluation = eval_examples(cfg, task)
    assert len(evaluation) == 5 and evaluation == eval_examples(cfg, task)  # seeded: the same every time
    assert evaluation != task.split("validation")[:5]  # a sample, not the first five
    assert reference_examples(cfg, task) == evaluation  # stage 1 chooses the reference on what it scores
    keys = {content_key(e) for e in evaluation}
    assert public_examples(cfg, task, task.spec) and not {content_key(e) for e in public_examples(cfg, task, task.spec)} & keys


def test_the_reference_is_chosen_on_validation_not_on_the_evaluation_split(tmp_path):
    """Zero-shot wins on validation and loses on test: the reference is zero-shot all the same."""
    validation = [Example(f"v{i}", i % 2) for i in range(10)]
    test = [Example(f"t{i}", i % 2) for i in range(10)]

    def predict(rows, text):
        gold = np.array([e.label for e in rows])
        right = (text == "") == rows[0].text.startswith("v")  # zero-shot right on validation, manual on test
        return gold if right else 1 - gold

    spec = load_task(compose([f"data_dir={write_secret_task(tmp_path)}", "task=secret"]).task, tmp_path).spec
    report = RunReport(tmp_path / "run", {})
    measure_references(report, predict, spec, test, validation)
    info = report.info
    assert info["reference_kind"] == "zero-shot" and info["reference_accuracy"] == 0.0
    assert info["manual_accuracy"] == 1.0 and info["zero_shot_accuracy"] == 0.0
    assert info["reference_choice"] == {"split": "validation", "n": 10, "manual": 0.0, "zero-shot": 1.0}
    with np.load(tmp_path / "run" / "predictions.npz") as saved:
        assert set(saved.files) == {"ids", "label", "manual", "zero_shot"} and len(saved["ids"]) == 10
    json.dumps(info)  # plain values: summary.json can hold them


@pytest.mark.parametrize("name", ["feddtpt_sst2", "feddtpt_trec", "feddtpt_agnews"])
def test_every_frozen_headline_config_is_a_valid_run(name):
    from pathlib import Path

    import yaml

    from fedprompt.runs.run_config import validate_config

    path = Path(__file__).resolve().parents[1] / "simulations" / "headline" / f"{name}.yaml"
    overrides = yaml.safe_load(path.read_text())["overrides"]
    assert not any(o.startswith("seed=") for o in overrides)  # run.sh sets the seeds
    cfg = compose(overrides)
    validate_config(cfg)
    assert cfg.federation.eval_split == "test" and cfg.method.name == name.split("_")[0]


def test_a_two_seed_sweep_of_real_runs_is_reported_with_intervals_and_gains(capsys, tmp_path, tiny_model_dir):
    """The acceptance of the protocol on real (tiny) runs: `fedprompt run -m seed=0,1` then `fedprompt report`."""
    sweep = tmp_path / "sweep"
    code = cli.main(["run", "-m", *tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), "seed=0,1",
                     f"hydra.sweep.dir={sweep}"])
    assert code == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    assert cli.main(["report", str(sweep)]) == 0
    (group,) = json.loads((sweep / "report" / "report.json").read_text())
    assert group["n_seeds"] == 2 and group["seeds"] == [0, 1] and group["eval_split"] == "test" and group["eval_n"] == 8
    assert set(group["final_accuracy"]) == {"mean", "ci95"} and len(group["final_accuracy"]["ci95"]) == 2
    assert group["reference"]["kind"] in ("manual", "zero-shot") and 0 <= group["reference"]["accuracy"] <= 1
    assert set(group["gain"]) == {"mean", "ci95", "p_value"} and 0 < group["gain"]["p_value"] <= 1
    low, high = group["gain"]["ci95"]
    assert low <= group["gain"]["mean"] <= high


def test_the_console_shows_rounds_and_errors_and_closes_with_the_results_table():
    from fedprompt.commands.launch import CONSOLE_LINES
    from fedprompt.runs.report import results_table

    assert CONSOLE_LINES.search("INFO :      round 2: accuracy 0.81, prompt 'Is it positive?'")
    assert CONSOLE_LINES.search("ERROR :     ServerApp raised an exception")
    assert not CONSOLE_LINES.search("Loading weights: 100%|##########| 272/272 [00:00<00:00, 21753.28it/s]")
    assert not CONSOLE_LINES.search("WARNING :   DEPRECATED FEATURE: ...")
    table = results_table({"method": "feddtpt", "task": "sst2", "eval_split": "test", "eval_n": 500,
                           "manual_accuracy": 0.804, "zero_shot_accuracy": 0.842, "reference_kind": "zero-shot",
                           "reference_accuracy": 0.842, "final_accuracy": 0.81, "output_dir": "/runs/a"})
    lines = table.splitlines()
    assert lines[0] == "sst2, test split, n=500:"
    assert "manual prompt" in lines[1] and "0.804" in lines[1] and "reference" not in lines[1]
    assert "zero-shot" in lines[2] and "<- reference" in lines[2]
    assert "FedDTPT final prompt" in lines[3] and "0.810" in lines[3]
    assert "-3.2 points" in lines[4] and lines[5].endswith("/runs/a/accuracy.png")
