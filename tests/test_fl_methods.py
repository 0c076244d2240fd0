"""Every method's server on the shared strategy (fedprompt.fl.strategy) honours the federation keys alike:
min_replies, eval_every, fraction_train, min_available_clients and audit_replies; a seed makes a run: two runs with the
same seed (behind other, late-connecting node ids) write the same rounds.json and end with the same arrays;
and a run stopped after round 1 resumes (resume=true) to the uninterrupted run's end, POST's DP accountants too.

The servers run in this process against an in-process Grid that hands each message to the real ClientApp (no
Ray: seconds), with the tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedprompt.config import compose
from fedprompt.fl.rounds import RoundDriver
from tests.fl_support import write_secret_task
from tests.rapt_support import one_thread  # noqa: F401 - fixture
from tests.test_resume import _rounds_json_but_timings
from tests.test_rounds import InProcessGrid, Stopped, _overrides, server_identity  # noqa: F401 - fixture

# Every method `fedprompt run` offers: fedprompt is POST's server and clients with the prompt tuned on model=.
METHODS = ["feddtpt", "post", "fedprompt", "rapt", "bbt", "bdpl"]


def overrides(method: str, data, model, folder, *extra: str) -> list[str]:
    if method == "fedprompt":
        base = _overrides("post", data, model, folder, *extra)
        return [o for o in base if not o.startswith(("method=", "method.model="))] + ["method=fedprompt"]
    return _overrides(method, data, model, folder, *extra)


def run_server(method: str, cfg, grid, monkeypatch) -> tuple[dict, dict]:
    """The server's summary and the final global arrays (as numpy) of one run."""
    from fedprompt.registry import federated_method

    final = {}
    real = RoundDriver.run

    def run(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        final.update({key: array.numpy() for key, array in result.arrays.items()})
        return result

    monkeypatch.setattr(RoundDriver, "run", run)
    return federated_method(str(cfg.method.name)).load("server")(grid, cfg), final


class LateGrid(InProcessGrid):
    """Nodes that connect one by one: ``get_node_ids`` lists one more node per call until all are there; every
    train message records how many nodes were connected when it was sent."""

    def __init__(self, cfg, node_ids, connected: int) -> None:
        super().__init__(cfg, node_ids=node_ids)
        self.order, self.connected, self.sent_with = list(node_ids), connected, []

    def get_node_ids(self):
        self.connected = min(self.connected + 1, len(self.order))
        return self.order[:self.connected]

    def send_and_receive(self, messages, timeout=None):
        self.sent_with += [self.connected for m in messages if "config" in m.content]
        return super().send_and_receive(messages, timeout)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_honours_min_replies_and_eval_every(server_identity, tmp_path, tiny_model_dir, monkeypatch, method):
    folder = tmp_path / "run"
    cfg = compose(overrides(method, write_secret_task(tmp_path / "data"), tiny_model_dir, folder,
                            "federation.min_replies=2", "federation.eval_every=2", "federation.audit_replies=true"))
    summary, _ = run_server(method, cfg, InProcessGrid(cfg, fails=lambda r, p: r == 1 and p == 1), monkeypatch)
    rows = json.loads((folder / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert summary["skipped_rounds"] == [1]
    assert rows[1]["skipped"] == "1 valid replies < federation.min_replies=2" and rows[1]["failures"] == 1
    assert rows[1]["failure_details"][0]["node"] == 202 and rows[1]["failure_details"][0]["code"] == 0
    assert rows[2]["skipped"] is None and rows[3]["skipped"] is None and rows[2]["replies"] == 2
    # eval_every=2 of 3 rounds: rounds 0, 2 and the last are scored, round 1 costs no evaluation
    assert [r["accuracy"] is None for r in rows] == [False, True, False, False]
    assert [r["eval_n"] for r in rows] == [8, 0, 8, 8]
    assert json.loads((folder / "checkpoint.json").read_text())["round"] == 3
    assert rows[1]["replies"] == 1
    # every method's strategy audits every reply as received, the failed one too (the template hands it the path)
    audited = [json.loads(line) for line in (folder / "replies.jsonl").read_text().splitlines()]
    train = [r for r in audited if r["type"] == "train"]
    assert [r["round"] for r in train] == [1, 1, 2, 2, 3, 3] and sum(r["error"] is not None for r in train) == 1
    # every method records its clients' metrics in partition order
    assert [c["partition-id"] for c in rows[2]["aggregation"]["clients"]] == [0, 1]
    if method == "rapt":  # the skipped round's examples are not pooled: round 2 starts the pool
        assert rows[1]["client_metrics"]["examples-pooled"] == 0
        assert rows[2]["client_metrics"]["examples-pooled"] == rows[2]["client_metrics"]["examples-received"] > 0
        assert summary["train_steps"] == 2 * 2  # rounds 2 and 3 only


@pytest.mark.parametrize("method", METHODS)
def test_every_method_samples_fraction_train_of_min_available_clients_and_a_seed_makes_the_run(
        server_identity, tmp_path, tiny_model_dir, monkeypatch, method):
    """3 clients, fraction_train=0.5 (ceil: 2 a round; BDPL: clients_per_round=2), min_available_clients=3 with
    nodes that connect late; the second run has other node ids in another order: the same rows, the same end."""
    data = write_secret_task(tmp_path / "data")
    runs = []
    for name, nodes in (("a", (101, 202, 303)), ("b", (9_000_000_001, 77, 4242))):
        cfg = compose(overrides(method, data, tiny_model_dir, tmp_path / name, "federation.num_clients=3",
                                "federation.rounds=2", "federation.fraction_train=0.5",
                                "federation.min_available_clients=3", "seed=3"))
        grid = LateGrid(cfg, nodes, connected=1 if name == "a" else 2)
        _, final = run_server(method, cfg, grid, monkeypatch)
        rows = json.loads((tmp_path / name / "rounds.json").read_text())
        assert grid.sent_with and set(grid.sent_with) == {3}  # no round started before all 3 were connected
        assert [r["clients_sampled"] for r in rows[1:]] == [2, 2] and [r["replies"] for r in rows[1:]] == [2, 2]
        runs.append((rows, final))
    (rows_a, final_a), (rows_b, final_b) = runs
    assert [r["accuracy"] for r in rows_a] == [r["accuracy"] for r in rows_b]
    assert _rounds_json_but_timings(tmp_path / "a") == _rounds_json_but_timings(tmp_path / "b")
    assert final_a.keys() == final_b.keys() and all(np.array_equal(final_a[k], final_b[k]) for k in final_a)
    sampled = [[c["partition-id"] for c in r["aggregation"]["clients"]] for r in rows_a[1:]]
    assert all(len(s) == 2 for s in sampled)  # two of the three partitions, drawn by the seed



# Every method, and POST with DP-SGD (its clients' accountants are their cross-round state).
RESUMABLE = [pytest.param(m, (), id=m) for m in METHODS] + [pytest.param("post", ("method.privacy.epsilon=8",), id="post-dp")]


@pytest.mark.parametrize("method, extra", RESUMABLE)
def test_every_method_stopped_after_round_1_resumes_to_the_uninterrupted_run(
        server_identity, tmp_path, tiny_model_dir, monkeypatch, method, extra):
    """3 rounds uninterrupted; the same stopped in round 2 (round 1's checkpoint on disk, no client of round 2
    ran), then resumed in a fresh grid (new contexts, other node ids: as after a restart, and this process's RNGs
    drawn on meanwhile): the same rows (but seconds), the same summary and the same final arrays."""
    import torch

    data = write_secret_task(tmp_path / "data")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    cfg = compose(overrides(method, data, tiny_model_dir, whole, *extra))
    summary, final = run_server(method, cfg, InProcessGrid(cfg), monkeypatch)

    cfg = compose(overrides(method, data, tiny_model_dir, stopped, *extra))
    with pytest.raises(Stopped):
        run_server(method, cfg, InProcessGrid(cfg, stop_at={2}), monkeypatch)
    checkpoint = json.loads((stopped / "checkpoint.json").read_text())
    assert checkpoint["round"] == 1 and len(json.loads((stopped / "rounds.json").read_text())) == 2
    assert (checkpoint["strategy"] is not None) == (method == "rapt")  # RAPT's trainer (pool, head, optimizer)
    torch.manual_seed(123)  # whatever this process drew since does not matter: the checkpoint's RNGs are restored
    np.random.seed(123)
    cfg = compose(overrides(method, data, tiny_model_dir, stopped, "resume=true", *extra))
    resumed, resumed_final = run_server(method, cfg, InProcessGrid(cfg, node_ids=(909, 808)), monkeypatch)

    assert _rounds_json_but_timings(stopped) == _rounds_json_but_timings(whole)
    assert final.keys() == resumed_final.keys() and all(np.array_equal(final[k], resumed_final[k]) for k in final)
    assert _but_timings(resumed, stopped) == _but_timings(summary, whole)  # the server's usage included
    if extra:  # the accountants went on from round 1's state: epsilon grows every round, the same in both runs
        epsilons = [r["client_metrics"]["epsilon-max"] for r in json.loads((whole / "rounds.json").read_text())[1:]]
        assert epsilons == sorted(set(epsilons)) and resumed["epsilon"] == summary["epsilon"] == epsilons[-1]


def _but_timings(summary: dict, folder) -> dict:
    """A summary without its seconds, its run folder ``folder`` in paths as ``<run>``."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.endswith(("_s", "-s"))}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value.replace(str(folder), "<run>") if isinstance(value, str) else value

    return strip(summary)


# --- the shared pieces on their own -------------------------------------------------------------------------


def test_combine_metrics_sums_costs_keeps_the_largest_guarantee_and_weights_the_rest():
    from fedprompt.fl.strategy import combine_metrics

    clients = [{"num-examples": 1, "partition-id": 0, "queries": 10, "bb-requests": 2, "train-s": 1.0, "loss": 1.0,
                "epsilon": 2.0, "delta": 1e-5},
               {"num-examples": 3, "partition-id": 1, "queries": 30, "bb-requests": 4, "train-s": 2.0, "loss": 3.0,
                "epsilon": 1.0, "delta": 2e-5, "entropy": 0.5}]
    assert combine_metrics(clients) == {"num-examples": 4.0, "queries": 40.0, "bb-requests": 6.0, "train-s": 3.0,
                                        "loss": 2.5, "epsilon-max": 2.0, "delta-max": 2e-5, "entropy": 0.5}
    assert combine_metrics([{"local-accuracy": 0.5}, {"local-accuracy": 1.0}]) == {"local-accuracy": 0.75}  # unweighted


def test_the_codec_round_trips_a_state_dict_and_names_what_is_wrong():
    import torch

    from fedprompt.fl.records import arrays_to_prompt, prompt_to_arrays

    arrays = prompt_to_arrays({"prompt": torch.ones(2, 3, requires_grad=True), "sigma": [0.5]})
    back = arrays_to_prompt(arrays, {"prompt": (None, 3), "sigma": (1,)})
    assert back["prompt"].dtype == np.float32 and back["prompt"].shape == (2, 3) and back["sigma"].tolist() == [0.5]
    for shapes, problem in (({"prompt": (2, 3)}, "must carry exactly"), ({"prompt": (2, 4), "sigma": (1,)}, "shape"),
                            ({"prompt": (None,), "sigma": (1,)}, "shape")):
        with pytest.raises(ValueError, match=problem):
            arrays_to_prompt(arrays, shapes)
    with pytest.raises(ValueError, match="non-finite"):
        arrays_to_prompt(prompt_to_arrays({"z": [np.nan]}), {"z": (1,)})


@pytest.mark.parametrize("codec", ["fedprompt.fl.feddtpt:arrays_to_words", "fedprompt.fl.bbt:arrays_to_point",
                                   "fedprompt.fl.bdpl:arrays_to_logits", "fedprompt.fl.rapt:arrays_to_examples"])
def test_every_codec_refuses_another_kind_of_record_with_a_value_error(codec):
    # A strategy records a ValueError as a malformed reply; anything else (AttributeError) would stop the server.
    from importlib import import_module

    from flwr.app import ConfigRecord, RecordDict

    from fedprompt.fl.records import array_record

    module, name = codec.split(":")
    decode = getattr(import_module(module), name)
    content = RecordDict({"arrays": ConfigRecord({"prompt": b"the", "z": [1.0], "logits": [1.0]})})
    with pytest.raises(ValueError, match="'arrays' holds a ConfigRecord instead of the layout's ArrayRecord"):
        decode(array_record(content))


def test_a_client_round_checks_the_federation_and_seeds_by_seed_round_and_partition():
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from fedprompt.fl.client import ClientRound, round_seed

    msg = SimpleNamespace(content=RecordDict({"config": ConfigRecord({"server-round": 2})}))
    context = SimpleNamespace(node_config={"partition-id": 1, "num-partitions": 3})
    now = ClientRound.of(msg, context, SimpleNamespace(seed=5), 3)
    assert (now.partition_id, now.server_round, now.seed) == (1, 2, round_seed(5, 2, 1))
    with pytest.raises(RuntimeError, match="3 SuperNodes .* federation.num_clients=2"):
        ClientRound.of(msg, context, SimpleNamespace(seed=5), 2)
    seeds = {round_seed(s, r, p) for s in range(3) for r in range(3) for p in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**32 for s in seeds)
