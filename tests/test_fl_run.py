"""`fedprompt run`: bad input is one clear line before any model loads or Flower starts; the config's trip."""

from __future__ import annotations

import json
import os
import tomllib
from contextlib import contextmanager

import pytest
from omegaconf import OmegaConf

from fedprompt import cli
from fedprompt.config import compose
from fedprompt.runs.run_config import RUN_CONFIG_KEY, config_from_run_config, serialize_config
from tests.fl_support import tiny_overrides, write_secret_task


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
        # issue 25: absurd or out-of-range values, refused before launch rather than run (or failed late)
        (["federation.rounds=1e20"], "federation.rounds must be a whole number (e.g. 3; not a string, 3.0 or true), "
                                     "got 1e+20"),
        (["federation.num_clients=2.0"], "federation.num_clients must be a whole number (e.g. 3; not a string, 3.0 or "
                                         "true), got 2.0"),
        (["federation.rounds=1000000000"], "federation.rounds must be >= 1 and <= 100000, got 1000000000"),
        (["federation.num_clients=100000000000000000000"], "federation.num_clients must be >= 1 and <= 100000"),
        (["federation.eval_limit=10000000000"], "federation.eval_limit must be >= 1 and <= 1000000000 (or null)"),
        (["federation.round_timeout_s=nan"], "federation.round_timeout_s must be >= 1 and <= 2592000, got nan"),
        (["federation.eval_sample_seed=-1"], "federation.eval_sample_seed must be >= 0 (or null), got -1"),
        (["seed=-1"], "seed must be in 0..4294967295, got -1"),
        (["federation.superlink_port=70000"], "federation.superlink_port must be >= 0 and <= 65535, got 70000"),
        (["service.kind=http", "service.port=70000"], "service.port must be an integer in 0..65535"),
        (["partition=dirichlet", "partition.alpha=inf"], "Dirichlet alpha must be > 0 and finite"),
        (["partition=dirichlet", "partition.alpha=nan"], "Dirichlet alpha must be > 0 and finite"),
        (["task=../secret"], "task='../secret' is not a plain folder name"),
        (["task=data/secret"], "task='data/secret' is not a plain folder name"),
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
    from fedprompt.commands.launch import free_port

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


@pytest.mark.parametrize("command, args, key", [
    (["run"], ["output_dir={blocked}/run"], "output_dir"),
    (["run"], ["hydra.run.dir={blocked}/run"], "hydra.run.dir"),
    (["run", "-m"], ["seed=0,1", "hydra.sweep.dir={blocked}/sweep"], "hydra.sweep.dir"),
    (["eval"], ["output_dir={blocked}/eval"], "output_dir"),
])
def test_an_unwritable_folder_is_one_line_before_anything_is_written(capsys, tmp_path, tiny_model_dir,
                                                                    nothing_expensive, monkeypatch, command, args, key):
    monkeypatch.chdir(tmp_path)
    blocked = tmp_path / "a-file"  # a folder inside a file cannot be made, whoever runs the test (root too)
    blocked.write_text("")
    args = [a.format(blocked=blocked) for a in args]
    code = cli.main([*command, *tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), *args])
    err = capsys.readouterr().err
    assert code == 2 and f"{key}=" in err and "is a file, not a folder" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_a_command_line_key_reaches_the_apps_but_no_file_of_the_run(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """service.api_key=... goes to the Flower processes as $FEDPROMPT_API_KEY; every file of the run holds ***
    (config.yaml, run_config.toml, Hydra's .hydra/*), also after a resume with another key. The simulation is a
    stub that reads the run config as the apps do (a real run is in test_fl_simulation.py)."""
    from fedprompt.blackbox import make_blackbox
    from fedprompt.blackbox.http_client import API_KEY_ENV
    from fedprompt.commands.launch import RunOutcome

    seen: list[tuple[str | None, str]] = []

    @contextmanager
    def superlink(log_path, cwd, port=0, extra_env=None):
        yield {**os.environ, **extra_env}  # the real one hands the flwr processes this environment (plus Flower's)

    def flwr_run(app_dir, run_config, num_supernodes, client_cpus, client_gpus, env, log, echo=None, echo_all=True):
        text = tomllib.loads(run_config.read_text())[RUN_CONFIG_KEY]
        received = config_from_run_config({RUN_CONFIG_KEY: text})  # what the ServerApp and ClientApps parse
        with monkeypatch.context() as app_process:
            app_process.setattr(os, "environ", env)
            with make_blackbox(received, kind="http") as service:  # builds the client; sends nothing
                seen.append((env.get(API_KEY_ENV), service.transport.client.headers.get("Authorization")))
        (run_config.parent / "summary.json").write_text(json.dumps({"rounds": 1, "client_replies": 2}))
        return RunOutcome(run_id=1, status="finished:completed", details="", elapsed_s=0.0)

    monkeypatch.setattr("fedprompt.commands.launch.local_superlink", superlink)
    monkeypatch.setattr("fedprompt.commands.launch.flwr_run", flwr_run)
    folder, keys = tmp_path / "run", ["sk-first-7f3a9c", "sk-second-52be01"]
    overrides = [*tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), f"output_dir={folder}"]
    assert cli.main(["run", *overrides, f"service.api_key={keys[0]}"]) == 0
    assert cli.main(["resume", str(folder), f"service.api_key={keys[1]}"]) == 0
    assert seen == [(key, f"Bearer {key}") for key in keys]

    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "config.yaml", "run_config.toml"} <= {
        str(p.relative_to(folder)) for p in files}
    out, err = capsys.readouterr()
    for key in keys:
        assert not [p for p in files if key.encode() in p.read_bytes()] and key not in out + err
    assert OmegaConf.load(folder / "config.yaml").service.api_key == "***"
    assert "service.api_key=***" in OmegaConf.load(folder / ".hydra" / "overrides.yaml")

    monkeypatch.delenv(API_KEY_ENV)  # a resume in a new shell, of a run that needs its key: said before launch
    assert cli.main(["resume", str(folder), "service.kind=http"]) == 2
    assert "give the key again with service.api_key=<key> or export FEDPROMPT_API_KEY" in capsys.readouterr().err
