"""The ClientApp of every method: it reads the run's config and hands the message to the method's client,
with the client's ``context.state`` kept on disk between rounds (fedprompt.fl.checkpoint: resume).

A failure is answered with a Flower error whose reason names only the exception type: a traceback or a
message could quote local data, so the details are logged here, on the client.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedprompt.fl.records import CONFIG, METRICS, server_round_of

log = logging.getLogger("fedprompt.fl.client")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        from fedprompt.fl.checkpoint import restore_client_state, save_client_state
        from fedprompt.registry import federated_method
        from fedprompt.runs.run_config import config_from_run_config

        cfg = config_from_run_config(context.run_config)
        server_round = server_round_of(msg)
        restore_client_state(cfg, context, server_round)  # a resumed run starts with an empty context.state
        reply = federated_method(cfg.method.name).load("client")(msg, context, cfg)
        save_client_state(cfg, context, server_round)
        return reply
    except Exception as err:  # noqa: BLE001 - every failure becomes an error reply the strategy skips
        log.error("client %s failed in round %s:\n%s", context.node_config.get("partition-id"),
                  _round_of(msg), traceback.format_exc())
        reason = f"{type(err).__module__}.{type(err).__name__} on the client (details in the client's log)"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """Which data partition this node holds (``partition-id`` of its node config), nothing else.

    Flower's node ids are random per run; a strategy that activates a few clients a round (BDPL/FedOne)
    asks once and samples partitions, so the same seed activates the same clients in every run and resume.
    """
    pid = context.node_config.get("partition-id")
    content = RecordDict({METRICS: MetricRecord({"partition-id": int(pid)})}) if pid is not None else RecordDict()
    return Message(content, reply_to=msg)


def _round_of(msg: Message) -> Any:
    try:
        return msg.content[CONFIG]["server-round"]
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"
