"""The shared round driver (fedprompt.fl.rounds): eval_every, min_replies and the checkpoint every round (every
method's server on it, and resumed on it: tests/test_fl_methods.py). The servers run in this process against an
in-process Grid that hands each message to the real ClientApp (no Ray: seconds), with clients that fail on demand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import OmegaConf

from fedprompt.fl import client_app
from fedprompt.fl.post import PromptFedAvg
from fedprompt.fl.rounds import Federation, RoundDriver, Scored
from fedprompt.runs.report import RunReport
from fedprompt.runs.run_config import RUN_CONFIG_KEY, serialize_config
from tests.test_resume import NoGrid, NoisyStrategy


@pytest.fixture
def server_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


# --- the driver alone ------------------------------------------------------------------------------------------


class ToyStrategy(NoisyStrategy):
    """NoisyStrategy with the federation keys the driver checks."""

    def __init__(self, min_replies: int = 1, min_available_nodes: int = 2) -> None:
        super().__init__()
        self.min_replies, self.min_available_nodes = min_replies, min_available_nodes


def _toy_cfg(folder: Path, **federation) -> OmegaConf:
    return OmegaConf.create({"seed": 0, "resume": False, "output_dir": str(folder),
                             "federation": {"num_clients": 2, "rounds": 5, "eval_every": 2, **federation}})


def test_the_driver_scores_round_0_every_kth_and_the_last_round_and_checkpoints_every_round(tmp_path):
    from fedprompt.data import Example

    cfg = _toy_cfg(tmp_path)
    examples = [Example(f"row {i}", i % 2) for i in range(4)]
    report, strategy = RunReport(tmp_path, {"method": "toy"}), ToyStrategy()
    calls, checkpoints = [], []

    def score(server_round, arrays, due):
        calls.append((server_round, due))
        checkpoints.append(json.loads((tmp_path / "checkpoint.json").read_text())["round"] if server_round else None)
        return Scored(predictions=np.array([0, 1, 1, 1]), queries=4) if due else Scored(queries=99)

    result = RoundDriver(cfg, tmp_path, report, strategy, examples).run(NoGrid(), ArrayRecord({"x": Array(np.zeros(2))}),
                                                                        score)
    assert calls == [(0, True), (1, False), (2, True), (3, False), (4, True), (5, True)]
    assert checkpoints[1:] == [0, 1, 2, 3, 4]  # round r-1's checkpoint is on disk when round r is scored
    assert json.loads((tmp_path / "checkpoint.json").read_text())["round"] == 5
    assert [r["accuracy"] for r in report.rows] == [0.75, None, 0.75, None, 0.75, 0.75]
    assert [r["eval_n"] for r in report.rows] == [4, 0, 4, 0, 4, 4]
    assert [r["eval_queries"] for r in report.rows] == [4, 0, 4, 0, 4, 4]  # a round not due costs nothing
    assert list(report.predictions["final"]) == [0, 1, 1, 1]
    assert len(result.arrays) == 1


@pytest.mark.parametrize("strategy, message", [
    (ToyStrategy(min_replies=1), "federation.min_replies resolves to 2"),
    (ToyStrategy(min_replies=2, min_available_nodes=1), "federation.min_available_clients resolves to 2"),
])
def test_the_driver_refuses_a_strategy_that_ignores_a_federation_key(tmp_path, strategy, message):
    with pytest.raises(ValueError, match=message):
        RoundDriver(_toy_cfg(tmp_path, min_replies=2), tmp_path, RunReport(tmp_path, {}), strategy, [])


def test_federation_resolves_min_available_clients_and_the_due_rounds():
    fed = Federation.from_cfg(OmegaConf.create({"federation": {"num_clients": 4, "rounds": 7, "eval_every": 3,
                                                               "min_available_clients": None}}))
    assert fed.min_available_clients == 4 and [r for r in range(8) if fed.due(r)] == [0, 3, 6, 7]
    assert fed.fedavg_kwargs() == {"fraction_train": 1.0, "min_train_nodes": 1, "min_available_nodes": 4,
                                   "min_replies": 1}


# --- POST's strategy: min_replies ------------------------------------------------------------------------------


def _post_reply(node: int, value: float, pid: int) -> Message:
    from tests.test_post_fl import train_message

    content = RecordDict({"arrays": ArrayRecord({"prompt": Array(np.full((2, 3), value, dtype=np.float32))}),
                          "metrics": MetricRecord({"num-examples": 2, "partition-id": pid})})
    return Message(content, reply_to=train_message(node, 1, np.zeros((2, 3), np.float32)))


@pytest.mark.parametrize("min_replies, skipped", [(2, True), (1, False)])
def test_post_skips_a_round_with_fewer_valid_replies_than_min_replies(server_identity, min_replies, skipped):
    from tests.test_post_fl import train_message

    strategy = PromptFedAvg(min_train_nodes=1, min_available_nodes=1, min_replies=min_replies)
    strategy._shape = (2, 3)
    error = Message(Error(code=0, reason="down"), reply_to=train_message(9, 1, np.zeros((2, 3), np.float32)))
    arrays, metrics = strategy.aggregate_train(1, [_post_reply(5, 1.0, 0), error])
    stats = strategy.rounds[1]
    assert stats.replies == 1 and len(stats.failures) == 1
    assert (arrays is None) == skipped
    assert (stats.skipped == "1 valid replies < federation.min_replies=2") if skipped else stats.skipped is None
    assert metrics["num-examples"] == 2  # the round's record keeps what did arrive


def test_post_averages_in_partition_order_whatever_the_node_ids(server_identity):
    def run(nodes):
        strategy = PromptFedAvg(min_train_nodes=1, min_available_nodes=1)
        strategy._shape = (2, 3)
        replies = [_post_reply(n, v, p) for n, v, p in zip(nodes, (0.1, 0.7, 0.3), (2, 0, 1))]
        arrays, _ = strategy.aggregate_train(1, replies)
        return arrays["prompt"].numpy(), [c["partition-id"] for c in strategy.rounds[1].aggregation["clients"]]

    first, second = run([3, 1, 2]), run([10, 30, 20])
    assert first[1] == second[1] == [0, 1, 2] and first[0].tobytes() == second[0].tobytes()


# --- an in-process grid for every method's server (tests/test_fl_methods.py) ---------------------------------------


class Stopped(Exception):
    pass


class InProcessGrid:
    """A Grid whose nodes are ClientApp calls in this process; ``fails(round, partition)`` -> an error reply;
    a round in ``stop_at`` raises Stopped before any client runs (a stop while the round runs)."""

    def __init__(self, cfg, node_ids=(101, 202), fails=lambda r, p: False, stop_at=()) -> None:
        run_config = {RUN_CONFIG_KEY: serialize_config(cfg)}
        self.partition = {node: pid for pid, node in enumerate(node_ids)}
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=run_config,
                                       node_config={"partition-id": pid, "num-partitions": len(node_ids)})
                         for node, pid in self.partition.items()}
        self.fails, self.stop_at = fails, set(stop_at)

    def get_node_ids(self):
        return list(self.partition)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's Grid does when it sends
            node = int(msg.metadata.dst_node_id)
            if "config" not in msg.content:  # BDPL's partition query
                replies.append(client_app.app(msg, self.contexts[node]))
                continue
            server_round = int(msg.content["config"]["server-round"])
            if server_round in self.stop_at:
                raise Stopped
            if self.fails(server_round, self.partition[node]):
                replies.append(Message(Error(code=0, reason="lost"), reply_to=msg))
            else:
                replies.append(client_app.app(msg, self.contexts[node]))
        return replies


def _overrides(method: str, data: Path, model: Path, folder: Path, *extra: str) -> list[str]:
    from tests.fl_support import tiny_overrides
    from tests.test_bbt import bbt_overrides
    from tests.test_bdpl import bdpl_overrides
    from tests.test_post_fl import post_overrides
    from tests.test_rapt_fl import rapt_overrides

    base = {"rapt": rapt_overrides, "post": post_overrides, "feddtpt": tiny_overrides, "bbt": bbt_overrides,
            "bdpl": lambda d, m: [*bdpl_overrides(d, m), "method.clients_per_round=2"]}[method](data, model)
    return [*base, "federation.rounds=3", "federation.eval_limit=8", "federation.eval_references=false",
            f"output_dir={folder}", *extra]
