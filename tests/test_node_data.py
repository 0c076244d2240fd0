"""A SuperNode's own data (fedprompt.commands.partition, fedprompt.runs.node_data): `fedprompt partition` writes one
folder per partition with the simulation's partition logic; a node whose node config names a data-dir reads only
that folder (never the task's train split), and a wrong folder is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedprompt import cli
from fedprompt.config import compose
from fedprompt.errors import ConfigError, DataError
from fedprompt.runs.data import client_data
from fedprompt.runs.node_data import partition_folder
from tests.fl_support import TRAIN_TEXTS, tiny_overrides, write_secret_task

SCHEMES = {"iid": ["partition=iid"], "dirichlet": ["partition=dirichlet", "partition.alpha=0.5"]}


def _args(tmp_path: Path, model_dir: Path, clients: int = 3, *extra: str) -> list[str]:
    return [*tiny_overrides(write_secret_task(tmp_path / "data"), model_dir, clients=clients),
            "partition.k_shot=null", *extra]


def _partition(capsys, args: list[str], out: Path) -> dict:
    code = cli.main(["partition", *args, f"output_dir={out}"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


def _node(i: int, n: int, folder: Path | str) -> dict:
    return {"partition-id": i, "num-partitions": n, "data-dir": str(folder)}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_each_folder_holds_exactly_the_simulations_partition_and_a_node_reads_only_its_own(
        capsys, tmp_path, tiny_model_dir, scheme):
    args = _args(tmp_path, tiny_model_dir, 3, *SCHEMES[scheme])
    out = tmp_path / "parts"
    record = _partition(capsys, args, out)
    cfg = compose(args)
    simulated = client_data(cfg)  # what `fedprompt run` builds in every ClientApp
    assert record["num_partitions"] == 3 and record["sizes"] == [len(c) for c in simulated.partition.clients]
    assert record["node_configs"][1] == f'partition-id=1 num-partitions=3 data-dir="{partition_folder(out, 1).resolve()}"'
    # Every node gets a host of its own: a copy of its folder only, with the task's own folder gone.
    shutil.rmtree(tmp_path / "data")
    for i in range(3):
        host = tmp_path / f"host-{i}"
        shutil.copytree(partition_folder(out, i), host)
        node = client_data(cfg, _node(i, 3, host))
        assert node.own == i and node.partition.clients[i] == simulated.partition.clients[i]  # same rows and order
        assert node.public == simulated.public and node.spec == simulated.spec
        assert [len(c) for j, c in enumerate(node.partition.clients) if j != i] == [0, 0]  # never saw the others
    assert sorted(e.text for c in simulated.partition.clients for e in c) == sorted(TRAIN_TEXTS)


def test_client_data_takes_the_node_config_and_never_opens_the_tasks_train_split(capsys, tmp_path, tiny_model_dir):
    args = _args(tmp_path, tiny_model_dir, 2)
    out = tmp_path / "parts"
    _partition(capsys, args, out)
    cfg = compose(args)
    expected = client_data(cfg).partition.clients[1]
    (tmp_path / "data" / "secret" / "train.jsonl").unlink()  # the simulation's source is gone
    shutil.rmtree(partition_folder(out, 0))  # and so is the other organisation's folder
    data = client_data(cfg, _node(1, 2, partition_folder(out, 1)))
    assert data.own == 1 and data.partition.clients[1] == expected
    # A simulation's node config (no data-dir) still builds every partition in-process.
    with pytest.raises(DataError, match="train.jsonl: split file missing"):
        client_data(cfg, {"partition-id": 0, "num-partitions": 2})


@pytest.fixture
def written(capsys, tmp_path, tiny_model_dir):
    args = _args(tmp_path, tiny_model_dir, 2)
    _partition(capsys, args, tmp_path / "parts")
    return compose(args), tmp_path / "parts"


def _one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def test_a_missing_folder_names_the_fix(written):
    cfg, out = written
    missing = out / "partition_7"
    with pytest.raises(DataError) as err:
        client_data(cfg, _node(0, 2, missing))
    text = _one_line(err.value)
    assert f"data folder '{missing}'" in text and "does not exist" in text and "fedprompt partition" in text


def test_rows_that_do_not_match_the_task_are_refused_with_file_and_line(written):
    cfg, out = written
    folder = partition_folder(out, 0)
    rows = (folder / "train.jsonl").read_text().splitlines()
    rows[1] = json.dumps({"text": "a row of another task", "label": 4})
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        client_data(cfg, _node(0, 2, folder))
    text = _one_line(err.value)
    assert f"{folder / 'train.jsonl'}:2: label 4 out of range" in text and "task 'secret'" in text


def test_a_partition_id_mismatch_is_refused(written):
    cfg, out = written
    with pytest.raises(DataError) as err:
        client_data(cfg, _node(1, 2, partition_folder(out, 0)))
    text = _one_line(err.value)
    assert "holds partition 0 of 2 (its partition.json), but the node config says partition-id=1" in text
    assert "partition_1" in text


@pytest.mark.parametrize("edit, node, error, message", [
    ("task", _node(0, 2, "{folder}"), DataError, "holds task 'sst2''s rows"),
    (None, _node(0, 3, "{folder}"), ConfigError, "3 SuperNodes (node config num-partitions) but federation.num_clients=2"),
    (None, {"data-dir": "{folder}"}, ConfigError, "also needs partition-id and num-partitions"),
    ("public", _node(0, 2, "{folder}"), DataError, "public.jsonl: missing, but federation.public_size=4"),
    ("meta", _node(0, 2, "{folder}"), DataError, "meta.json: missing"),
    (None, {**_node(0, 2, "x"), "data-dir": 3}, DataError, "is not a path: quote it"),
])
def test_other_wrong_folders_are_refused_in_one_line(written, edit, node, error, message):
    cfg, out = written
    folder = partition_folder(out, 0)
    if edit == "task":
        info = json.loads((folder / "partition.json").read_text())
        (folder / "partition.json").write_text(json.dumps({**info, "task": "sst2"}))
    elif edit == "public":
        (folder / "public.jsonl").unlink()
    elif edit == "meta":
        (folder / "meta.json").unlink()
    node = {k: v.format(folder=folder) if isinstance(v, str) else v for k, v in node.items()}
    with pytest.raises(error) as err:
        client_data(cfg, node)
    assert message in _one_line(err.value)


def test_a_folder_an_organisation_wrote_itself_needs_no_partition_json(written):
    cfg, out = written
    folder = partition_folder(out, 1)
    (folder / "partition.json").unlink()
    (folder / "train.jsonl").write_text(json.dumps({"text": "our own row", "label": 1}) + "\n")
    data = client_data(cfg, _node(1, 2, folder))
    assert [e.text for e in data.partition.clients[1]] == ["our own row"]


def test_the_command_refuses_to_overwrite_partitions_and_bad_input_in_one_line(capsys, tmp_path, tiny_model_dir):
    args = _args(tmp_path, tiny_model_dir, 2)
    _partition(capsys, args, tmp_path / "parts")
    assert cli.main(["partition", *args, f"output_dir={tmp_path / 'parts'}"]) == 2
    err = capsys.readouterr().err
    assert "already holds partitions" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["partition", *_args(tmp_path, tiny_model_dir, 17), f"output_dir={tmp_path / 'more'}"]) == 2
    err = capsys.readouterr().err
    assert "17 clients but only 16 training examples" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "more").exists()
    assert cli.main(["partition", "--help"]) == 0 and "num_clients" in capsys.readouterr().out


def test_the_clientapp_trains_on_its_own_folder_without_the_task_data(capsys, tmp_path, tiny_model_dir, monkeypatch):
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedprompt.fl import client_app
    from fedprompt.methods.feddtpt.search import PromptSearch
    from fedprompt.runs.run_config import RUN_CONFIG_KEY, serialize_config
    from tests.test_fl_client import train_message

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    args = _args(tmp_path, tiny_model_dir, 2)
    out = tmp_path / "parts"
    _partition(capsys, args, out)
    expected = client_data(compose(args)).partition.clients[1]
    run_config = {RUN_CONFIG_KEY: serialize_config(compose(args))}
    shutil.rmtree(tmp_path / "data")  # the node's host has only its own folder
    shutil.rmtree(partition_folder(out, 0))
    seen = []
    search = PromptSearch.run

    def run(self, blackbox, spec, prompt, examples, *rest, **kwargs):
        seen.append(list(examples))
        return search(self, blackbox, spec, prompt, examples, *rest, **kwargs)

    monkeypatch.setattr(PromptSearch, "run", run)
    node = _node(1, 2, partition_folder(out, 1))
    reply = client_app.app(train_message(node_id=11), Context(run_id=1, node_id=11, state=RecordDict(),
                                                             run_config=run_config, node_config=node))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert seen == [expected]
    wrong = {**node, "partition-id": 0}  # its own folder under another partition id: an error reply
    reply = client_app.app(train_message(node_id=12), Context(run_id=1, node_id=12, state=RecordDict(),
                                                             run_config=run_config, node_config=wrong))
    assert reply.has_error() and "DataError" in reply.error.reason
