"""A SuperNode's own data: one folder per partition, written beforehand (fedprompt.commands.partition), and read
by that node alone (here).

``fedprompt partition task=... federation.num_clients=N partition=... output_dir=DIR`` writes, with the
partition logic of the simulation (fedprompt.runs.data: k-shot sample, evaluation-overlap exclusion, the seeded
flwr-datasets partitioner)::

    DIR/partitions.json               the partition's summary (sizes, label histograms, settings)
    DIR/partition_<i>/train.jsonl     partition i's training rows, in the order the simulation gives client i
    DIR/partition_<i>/meta.json       the task's label names ({"task", "labels"})
    DIR/partition_<i>/public.jsonl    the public pool (federation.public_size rows, the same in every folder)
    DIR/partition_<i>/partition.json  which partition this is: {"task", "partition_id", "num_partitions", ...}

Organisation i copies ``DIR/partition_<i>`` (only that) to its host and starts its SuperNode with
``--node-config 'partition-id=<i> num-partitions=<N> data-dir="/srv/fedprompt/partition_<i>"'``. Its
ClientApp then reads that folder and nothing else of the task's data (never ``<data_dir>/<task>/train.jsonl``):
:func:`load_node_data`. A folder an organisation writes itself needs ``train.jsonl`` and ``meta.json`` (and
``public.jsonl`` when ``federation.public_size`` > 0); ``partition.json`` is optional, and when present is
checked against the node config and the run's task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from fedprompt.data import Example, TaskSpec
from fedprompt.errors import ConfigError, DataError
from fedprompt.typed_config import plain_dict

NODE_DATA_KEY = "data-dir"  # the Flower node config key naming a SuperNode's own data folder
SUMMARY = "partitions.json"
INFO = "partition.json"
TRAIN, META, PUBLIC = "train.jsonl", "meta.json", "public.jsonl"


def partition_folder(root: str | Path, partition_id: int) -> Path:
    return Path(root) / f"partition_{int(partition_id)}"


def node_config_line(partition_id: int, num_partitions: int, folder: str | Path | None = None) -> str:
    """The ``--node-config`` value of SuperNode ``partition_id`` (a TOML string for the folder: Flower's syntax)."""
    line = f"partition-id={int(partition_id)} num-partitions={int(num_partitions)}"
    return line if folder is None else f"{line} {NODE_DATA_KEY}={json.dumps(str(folder))}"


def node_data_dir(node_config: Mapping[str, Any] | None) -> Path | None:
    """The folder ``data-dir`` of a node config names, or None (the simulation: every partition is built)."""
    value = (node_config or {}).get(NODE_DATA_KEY)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"node config {NODE_DATA_KEY}={value!r} is not a path: quote it, e.g. --node-config "
                        f"'partition-id=0 num-partitions=3 {NODE_DATA_KEY}=\"/srv/fedprompt/partition_0\"'")
    return Path(value).expanduser()


def partition_settings(cfg: DictConfig) -> dict:
    """What decides which rows a partition holds (recorded in every folder)."""
    fed = cfg.federation
    return {"partition": OmegaConf.to_container(cfg.partition, resolve=True), "seed": int(cfg.seed),
            "eval_split": str(fed.eval_split), "eval_overlap": str(fed.get("eval_overlap", "refuse"))}


def public_settings(cfg: DictConfig) -> dict:
    """What decides the public pool; a node refuses a public.jsonl written for other settings."""
    fed = cfg.federation
    return {"split": str(fed.public_split), "size": int(fed.public_size), "seed": int(cfg.seed)}


def _read_info(folder: Path) -> dict | None:
    path = folder / INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read it as JSON ({err}); write the folder again with `fedprompt partition` "
                        "or delete partition.json") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object; write the folder again with `fedprompt partition`")
    return info


@dataclass(frozen=True)
class NodeData:
    """What a SuperNode reads from its own folder (fedprompt.runs.data.client_data makes its ClientData of it)."""

    spec: TaskSpec
    train: list[Example]
    public: list[Example]
    partition_id: int
    num_partitions: int


def load_node_data(cfg: DictConfig, node_config: Mapping[str, Any], folder: Path) -> NodeData:
    """This node's data from its own folder: its partition's training rows, the public pool and the label names,
    and no other file (the task's own folder is never opened)."""
    from fedprompt.data import load_task

    where = f"this SuperNode's data folder {str(folder)!r} (node config {NODE_DATA_KEY})"
    name, num_clients = str(cfg.task.name), int(cfg.federation.num_clients)
    if not folder.is_dir():
        raise DataError(f"{where} does not exist; write the partitions with `fedprompt partition task={name} "
                        f"federation.num_clients={num_clients} ... output_dir=DIR` and copy DIR/partition_<i> to "
                        f"this host, or fix {NODE_DATA_KEY} in the SuperNode's --node-config")
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ConfigError(f"{where}: the node config also needs partition-id and num-partitions, e.g. "
                          f"--node-config '{node_config_line(0, num_clients, folder)}'")
    partition_id, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if num_partitions != num_clients:
        raise ConfigError(f"{num_partitions} SuperNodes (node config num-partitions) but federation.num_clients="
                          f"{num_clients}; give every SuperNode num-partitions={num_clients}, or run with "
                          f"federation.num_clients={num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"node config partition-id={partition_id} is not in 0..{num_partitions - 1}")
    info = _read_info(folder)
    if info is not None:
        if info.get("task") != name:
            raise DataError(f"{where} holds task {info.get('task')!r}'s rows (its partition.json), but this run's "
                            f"task is {name!r}; point {NODE_DATA_KEY} at a partition of task {name}")
        held = (info.get("partition_id"), info.get("num_partitions"))
        if held != (partition_id, num_partitions):
            raise DataError(f"{where} holds partition {held[0]} of {held[1]} (its partition.json), but the node config "
                            f"says partition-id={partition_id} num-partitions={num_partitions}; point {NODE_DATA_KEY} "
                            f"at DIR/partition_{partition_id}, or start this SuperNode with partition-id={held[0]}")
    task_cfg = dict(plain_dict(cfg.task), path=str(folder))  # never <data_dir>/<task>
    try:
        task = load_task(task_cfg, None)
        spec = task.spec.with_chat_format(cfg.model.get("chat_format"))
        train = task.split("train")
        public = _node_public(cfg, folder, info, spec)
    except DataError as err:
        raise DataError(f"{err} (in {where}: it must hold task {name!r}'s rows and label names)") from None
    return NodeData(spec, train, public, partition_id, num_partitions)


def _node_public(cfg: DictConfig, folder: Path, info: dict | None, spec) -> list[Example]:
    from fedprompt.data.loading import read_jsonl_split

    settings = public_settings(cfg)
    if settings["size"] == 0:
        return []
    path = folder / PUBLIC
    if not path.is_file():
        raise DataError(f"{path}: missing, but federation.public_size={settings['size']} needs the public pool; "
                        "write the folder with `fedprompt partition` (it adds public.jsonl), or set "
                        "federation.public_size=0")
    if info is not None and info.get("public") not in (None, settings):
        raise DataError(f"{path} was written for the public pool {info['public']} (partition.json), but the run "
                        f"asks for {settings} (federation.public_split, public_size, seed); write the partitions "
                        "again with the run's settings")
    return read_jsonl_split(path, spec.num_labels, spec.is_pair)
