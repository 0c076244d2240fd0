"""`fedprompt eval`: bad input fails before any model loads; a tiny-model run; one real-model run."""

from __future__ import annotations

import json

import pytest

from fedprompt import cli
from tests.conftest import SHARED_DATA


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr("fedprompt.models.load_causal_lm", refuse)


def _run(capsys, *args):
    code = cli.main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["task=nosuchtask"], "unknown task 'nosuchtask'"),
        (["task=toy", "model=no-such-model"], "unknown model 'no-such-model'"),
        (["task=toy", "data_dir=/no/such/folder"], "does not exist"),
        (["task=toy", "split=dev"], "unknown split 'dev'"),
        (["task=toy", "limit=0"], "limit must be >= 1"),
        (["task=toy", "nosuchkey=1"], "bad override"),
        (["task=toy", "model.dtype=float8"], "unknown dtype"),
        (["task=../toy"], "task='../toy' is not a plain folder name"),  # would read outside data_dir
        (["task=toy", "service.kind=pigeon"], "service.kind must be one of"),
        (["task=toy", "service.kind=openai", "service.client.max_prompts_per_request=0"], "max_prompts_per_request"),
    ],
)
def test_bad_input_is_reported_before_loading_a_model(capsys, tiny_data, tiny_model_dir, no_model_load, args, message):
    args = [f"data_dir={tiny_data}", f"model={tiny_model_dir}", *args]
    if any(a.startswith("data_dir=/no") for a in args):
        args = [a for a in args if a != f"data_dir={tiny_data}"]
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_malformed_row_is_reported_with_file_and_line(capsys, tiny_data, tiny_model_dir, no_model_load):
    with (tiny_data / "toy" / "test.jsonl").open("a") as fh:
        fh.write('{"text": "broken"\n')
    code, _, err = _run(capsys, "task=toy", f"data_dir={tiny_data}", f"model={tiny_model_dir}")
    assert code == 2 and "test.jsonl:13: malformed JSON" in err


@pytest.mark.parametrize("name, message", [
    ("test.jsonl", "test.jsonl:1: not UTF-8 (byte 0x89); split files must be UTF-8 JSON Lines"),
    ("meta.json", "meta.json:1: not UTF-8 (byte 0x89); meta.json must be UTF-8 JSON"),
])
def test_a_binary_data_file_is_one_line_naming_it(capsys, tiny_data, tiny_model_dir, no_model_load, name, message):
    (tiny_data / "toy" / name).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # e.g. an image saved under the name
    code, _, err = _run(capsys, "task=toy", f"data_dir={tiny_data}", f"model={tiny_model_dir}")
    assert code == 2 and message in err and str(tiny_data / "toy" / name) in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_empty_label_word_is_rejected(capsys, tiny_data, tiny_model_dir, no_model_load):
    # (a non-empty word that a tokenizer maps to no ids is caught by encode_label_words: test_models.py)
    code, _, err = _run(capsys, "task=toy", f"data_dir={tiny_data}", f"model={tiny_model_dir}", "task.label_words=[' ', ' positive']")
    assert code == 2 and "label word ' ' is empty" in err


def test_eval_tiny_model_writes_json(capsys, tiny_data, tiny_model_dir, tmp_path):
    out_dir = tmp_path / "run"
    code, out, _ = _run(capsys, "task=toy", f"data_dir={tiny_data}", f"model={tiny_model_dir}", "model.dtype=float32",
                        f"output_dir={out_dir}", "calibrate=true", "progress=false")
    assert code == 0
    record = json.loads(out.strip().splitlines()[-1])
    assert record["n"] == 12 and 0 <= record["accuracy"] <= 1 and record["examples_per_s"] > 0
    assert record["calibrated_accuracy"] is not None
    assert record["service"] == "inprocess" and record["url"] is None and record["ties"] == 0
    assert json.loads((out_dir / "result.json").read_text()) == record


@pytest.mark.e2e
@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="needs ../shared/data")
def test_eval_embedded_smollm2_on_sst2(capsys, tmp_path):
    code, out, _ = _run(capsys, "task=sst2", "split=test", "limit=32", f"data_dir={SHARED_DATA}", f"output_dir={tmp_path}")
    assert code == 0
    record = json.loads(out.strip().splitlines()[-1])
    assert record["model"] == "smollm2-135m" and record["n"] == 32
    assert record["accuracy"] >= 0.6  # 0.79-0.82 on the full splits; 32 examples leave room for noise


@pytest.mark.parametrize("command, shown", [("eval", "split: str = test"), ("distill", "distill.* keys"),
                                            ("distill", "distill.loss.a_ce: float = 5.0"),
                                            ("transfer", "transfer.alpha_split: str = validation"),
                                            ("serve", "service.* keys"), ("serve", "service.limits.max_batch: int = 256"),
                                            ("run", "federation.num_clients: int = 10"),
                                            ("run", "method.search.budget: int = 1200"),
                                            ("deploy", "deploy.startup_timeout_s: float = 180"),
                                            ("report", "usage: fedprompt report <run or sweep folder>"),
                                            ("resume", "usage: fedprompt resume <run folder>")])
def test_every_command_has_its_own_help(capsys, command, shown):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert shown in out and "error" not in out.splitlines()[0]


def test_run_help_shows_the_chosen_method_and_each_key_has_its_type_value_and_help(capsys):
    assert cli.main(["run", "method=bdpl", "method.lr=0.5", "--help"]) == 0
    out = capsys.readouterr().out
    assert "method.samples_per_step: int = 4" in out and "method.search.budget" not in out
    assert "method.lr: float = 0.5" in out  # the value the run would use
    line = next(line for line in out.splitlines() if line.strip().startswith("federation.rounds:"))
    assert "federated rounds" in line  # its one line of help
