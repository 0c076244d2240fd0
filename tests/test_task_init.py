"""A new task out of the box (issue 26): the fallback prompt's calibration, the user's config folder, and
`fedprompt task init` (candidates scored on validation, a config written there and read by every command)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedprompt import cli
from fedprompt.config import compose, group_options
from fedprompt.errors import ConfigError
from fedprompt.models.calibration import CalibrationSettings, apply_bias, majority_rate, mean_bias
from fedprompt.task_init import candidates, label_word_sets
from fedprompt.ties import pick_labels


def biased_scores(labels, rng) -> np.ndarray:
    """Label log-scores of a model that sees the class (+2 for the right label) but prefers label 0 by 3."""
    margin = -3.0 + 2.0 * np.asarray(labels) + rng.normal(0, 0.3, len(labels))  # logit of label 1 over label 0
    return np.stack([np.zeros_like(margin), margin], axis=1) - np.logaddexp(0, margin)[:, None]


def test_mean_calibration_on_training_rows_undoes_a_label_preference():
    rng = np.random.default_rng(0)
    test_labels = rng.integers(0, 2, 400)
    raw = biased_scores(test_labels, rng)
    assert (pick_labels(raw)[0] == 0).all()  # uncalibrated: every row the preferred label, as the 0.381 report
    calib_labels = np.array([0, 1] * 16)
    bias = mean_bias(biased_scores(calib_labels, rng), calib_labels)
    accuracy = (pick_labels(apply_bias(raw, bias))[0] == test_labels).mean()
    assert accuracy > 0.95 and accuracy > majority_rate(test_labels)
    assert apply_bias(raw, None) is raw


def test_mean_bias_weighs_each_class_alike():
    # Nine rows of class 0 and one of class 1: a plain mean would read the split's balance as a preference.
    scores = np.log(np.array([[0.9, 0.1]] * 9 + [[0.1, 0.9]]))
    assert np.allclose(np.exp(mean_bias(scores, [0] * 9 + [1])), [0.5, 0.5])


def test_calibration_settings():
    assert CalibrationSettings.from_task({}).method == "none"  # named tasks: as they were
    assert compose(["task=newone"]).task.calibration == "mean"  # the fallback: calibrated by default
    with pytest.raises(ConfigError, match="task.calibration='median' is not one of"):
        CalibrationSettings.from_task({"calibration": "median"})
    with pytest.raises(ConfigError, match="calibration_examples must be >= 2"):
        CalibrationSettings.from_task({"calibration": "mean", "calibration_examples": 1})


def test_candidates_cover_prompts_templates_and_label_word_casings():
    assert label_word_sets(["negative", "positive"]) == [(" negative", " positive"), (" Negative", " Positive")]
    assert label_word_sets(["not_entailment", "Entailment"])[0] == (" not entailment", " Entailment")
    single = candidates(["negative", "positive"], is_pair=False)
    assert len(single) == 12 and single[0].prompt == "Classify the text as one of: negative, positive."
    assert {c.template for c in single} == {"{prompt}\n\nText: {text}", "Text: {text}\n\n{prompt}"}
    assert all("{text_pair}" in c.template for c in candidates(["yes", "no"], is_pair=True))
    assert "Is this text a, b or c?" in {c.prompt for c in candidates(["a", "b", "c"], is_pair=False)}


def _eval(capsys, *args) -> dict:
    assert cli.main(["eval", "progress=false", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_fallback_eval_reports_its_calibration_and_the_majority_class(capsys, tiny_data, tiny_model_dir, tmp_path):
    base = [f"data_dir={tiny_data}", f"model={tiny_model_dir}", "task=toy"]
    record = _eval(capsys, *base, f"output_dir={tmp_path / 'a'}")
    assert record["calibration"]["method"] == "mean" and record["calibration"]["split"] == "train"
    assert record["calibration"]["examples"] == 12 and len(record["calibration"]["bias"]) == 2  # all of toy's train
    assert record["majority_accuracy"] == 0.5 and record["uncalibrated_accuracy"] is not None
    plain = _eval(capsys, *base, "task.calibration=none", f"output_dir={tmp_path / 'b'}")
    assert plain["calibration"] == {"method": "none"} and plain["uncalibrated_accuracy"] is None
    assert plain["accuracy"] == record["uncalibrated_accuracy"]  # the same scores, without the bias


def test_eval_says_when_it_is_below_the_majority_class(capsys, tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("fedprompt.models.calibration.majority_rate", lambda labels: 1.0)
    assert cli.main(["eval", "progress=false", f"data_dir={tiny_data}", f"model={tiny_model_dir}", "task=toy",
                     f"output_dir={tmp_path}"]) == 0
    assert "is below always answering the most frequent class (1.000)" in capsys.readouterr().err


def _init(capsys, *args) -> tuple[int, dict | None, str]:
    code = cli.main(["task", "init", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


def test_task_init_writes_a_config_that_eval_and_run_read(capsys, tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    conf = tmp_path / "myconf"
    monkeypatch.setenv("FEDPROMPT_CONF_DIR", str(conf))
    code, record, err = _init(capsys, str(tiny_data / "toy"), f"model={tiny_model_dir}", "progress=false")
    assert code == 0, err
    path = conf / "task" / "toy.yaml"
    assert record["config"] == str(path) and path.is_file()
    assert record["split"] == "validation" and record["n"] == 12 and len(record["candidates"]) == 12
    assert record["chosen"]["accuracy"] == max(c["accuracy"] for c in record["candidates"])
    assert err.count("\n* ") == 1 and "val_acc" in err  # every candidate's validation accuracy, the chosen marked
    assert "toy" in group_options("task")

    chosen = record["chosen"]
    result = _eval(capsys, "task=toy", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'e'}")  # no data_dir
    assert result["prompt"] == chosen["prompt"] and result["data"] == str(tiny_data / "toy")
    assert result["calibration"]["method"] == "mean"
    cfg = compose(["task=toy"])
    assert list(cfg.task.label_words) == chosen["label_words"] and cfg.task.template == chosen["template"]

    assert cli.main(["run", "task=toy", "--cfg", "job"]) == 0  # `fedprompt run` searches the same folder
    assert chosen["prompt"] in capsys.readouterr().out

    code, _, err = _init(capsys, str(tiny_data / "toy"), f"model={tiny_model_dir}")
    assert code == 2 and "exists; force=true overwrites it" in err


def test_task_init_default_folder_and_pair_tasks(capsys, tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no FEDPROMPT_CONF_DIR: ~/.config/fedprompt
    code, record, err = _init(capsys, str(tiny_data / "toypair"), "name=mypair", f"model={tiny_model_dir}",
                              "progress=false", "limit=6")
    assert code == 0, err
    assert record["config"] == str(tmp_path / "xdg" / "fedprompt" / "task" / "mypair.yaml") and record["n"] == 6
    assert all("{text_pair}" in c["template"] for c in record["candidates"])  # detected from the rows
    assert compose(["task=mypair"]).task.is_pair is True


@pytest.mark.parametrize("args, message", [
    (["name=sst2"], "name='sst2' is a task of conf/task already"),
    (["name=a b"], "a task name is letters, digits"),
    (["service.kind=openai", "service.url=http://127.0.0.1:9"], "task init scores its candidates with the model loaded"),
    (["task.calibration=median"], "task.calibration='median' is not one of"),
    (["task=sst2"], "task init names the task itself"),
])
def test_task_init_refuses_bad_input_before_loading_a_model(capsys, tiny_data, tiny_model_dir, nothing_expensive,
                                                            tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("FEDPROMPT_CONF_DIR", str(tmp_path / "conf"))
    code, _, err = _init(capsys, str(tiny_data / "toy"), f"model={tiny_model_dir}", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_task_init_needs_a_folder_with_validation(capsys, tiny_data, tmp_path, nothing_expensive, monkeypatch):
    monkeypatch.setenv("FEDPROMPT_CONF_DIR", str(tmp_path / "conf"))
    assert _init(capsys, str(tmp_path / "nowhere"))[0] == 2
    (tiny_data / "toy" / "validation.jsonl").unlink()
    code, _, err = _init(capsys, str(tiny_data / "toy"))
    assert code == 2 and "task init chooses its prompt on the validation split (never test)" in err
    assert "usage: fedprompt task init <folder>" in (cli.main(["task"]), capsys.readouterr().err)[1]


def test_user_config_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPROMPT_CONF_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="FEDPROMPT_CONF_DIR=.* is not a folder"):
        compose([])  # a typo must not hide the user's configs silently
    (tmp_path / "conf" / "task").mkdir(parents=True)
    (tmp_path / "conf" / "task" / "sst2.yaml").write_text("name: sst2\n")
    monkeypatch.setenv("FEDPROMPT_CONF_DIR", str(tmp_path / "conf"))
    with pytest.raises(ConfigError, match="task/sst2.yaml would be ignored: conf/ has files of the same name"):
        compose([])


def test_task_help(capsys):
    assert cli.main(["task", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fedprompt task init <folder>") and "split: str = test" in out
