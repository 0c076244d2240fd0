"""`fedprompt run`: bad input is one clear line before any model loads or Flower starts; the config's trip."""

from __future__ import annotations

import json

import pytest

from fedprompt import cli
from fedprompt.config import compose
from fedprompt.fl.config import RUN_CONFIG_KEY, config_from_run_config, serialize_config
from tests.fl_support import tiny_overrides, write_secret_task


@pytest.fixture
def nothing_expensive(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or a simulation started before the input was validated")

    monkeypatch.setattr("fedprompt.models.load_causal_lm", refuse)
    monkeypatch.setattr("fedprompt.fl.launch.local_superlink", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["partition=dirichlet", "partition.alpha=0"], "Dirichlet alpha must be > 0"),
        (["partition=dirichlet", "partition.alpha=-1"], "Dirichlet alpha must be > 0"),
        (["federation.num_clients=17"], "17 clients but only 16 training examples"),
        (["partition.k_shot=9"], "k=9 per class is larger than what the split holds"),
        (["partition=pathological", "partition.classes_per_client=3"], "exceeds the task's 2 classes"),
        (["partition.scheme=random"], "partition.scheme='random' is not one of"),
        (["method.name=nosuch"], "fedprompt run supports method=feddtpt"),
        (["method.search.budget=1"], "search.budget=1"),
        (["federation.rounds=0"], "federation.rounds must be >= 1"),
        (["federation.fraction_train=0"], "federation.fraction_train must be in (0, 1]"),
        (["federation.public_split=test"], "none are left once the evaluation examples are set aside"),
        (["federation.eval_overlap=maybe"], "federation.eval_overlap must be one of refuse | exclude"),
        (["federation.reference_limit=0"], "federation.reference_limit must be >= 1"),
        (["federation.eval_limit=0"], "federation.eval_limit must be >= 1"),
        (["service.kind=carrier-pigeon"], "service.kind must be one of"),
        (["task=nosuchtask"], "unknown task 'nosuchtask'"),
    ],
)
def test_bad_input_is_one_line_before_anything_expensive(capsys, tmp_path, tiny_model_dir, nothing_expensive,
                                                        args, message):
    code = cli.main(["run", *tiny_overrides(write_secret_task(tmp_path), tiny_model_dir), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_an_unreachable_service_is_reported_before_the_simulation(capsys, tmp_path, tiny_model_dir, nothing_expensive):
    from fedprompt.fl.launch import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = cli.main(["run", *tiny_overrides(write_secret_task(tmp_path), tiny_model_dir), "service.kind=http",
                     f"service.url={url}", "service.client.retries=0"])
    err = capsys.readouterr().err
    assert code == 2 and url in err and "Traceback" not in err


def test_the_config_reaches_the_apps_whole_and_with_absolute_paths(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_secret_task(tmp_path / "data")
    cfg = compose([*tiny_overrides("data", tiny_model_dir), "output_dir=out", "federation.rounds=4"])
    received = config_from_run_config({RUN_CONFIG_KEY: serialize_config(cfg)})
    assert received.data_dir == str(tmp_path / "data") and received.output_dir == str(tmp_path / "out")
    assert received.federation.rounds == 4 and received.method.search.budget == 60
    assert received.service.port == cfg.service.port  # interpolations are resolved before the trip
    with pytest.raises(ValueError, match="JSON"):
        config_from_run_config({RUN_CONFIG_KEY: "{not json"})
    bad = json.loads(serialize_config(cfg))
    bad["partition"]["scheme"] = "random"
    with pytest.raises(ValueError, match="partition.scheme"):
        config_from_run_config({RUN_CONFIG_KEY: json.dumps(bad)})  # the apps re-validate what they receive
