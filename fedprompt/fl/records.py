"""What every method's Flower messages share: the record names, the size and bytes of a message, and the
reply audit.

Server -> client: ``"arrays"`` (the method's model: a prompt, soft-prompt weights) and ``"config"`` (at
least ``server-round``). Client -> server: ``"arrays"`` and ``"metrics"`` (numbers only). Each method's
own layout is documented in ``fedprompt/fl/<method>/records.py``.

The reply audit (``federation.audit_replies=true``): every strategy hands each message it receives from the
clients to :func:`audit_replies` before it looks at it, which appends one JSON line per message to
``<run folder>/replies.jsonl`` (:data:`AUDIT_FILE`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Message, RecordDict

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
AUDIT_FILE = "replies.jsonl"


def record_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content (Flower's protobuf encoding): the bytes on the wire."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())


def serialize_content(content: RecordDict) -> bytes:
    """The exact bytes a message's content is sent as (for the reply audit)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def audit_path(cfg, folder: str | Path) -> Path | None:
    """Where a run's strategy audits the replies: ``<folder>/replies.jsonl`` with ``federation.audit_replies``,
    else None (no audit)."""
    return Path(folder) / AUDIT_FILE if bool(cfg.federation.get("audit_replies", False)) else None


def audit_replies(path: str | Path | None, server_round: int, replies: Iterable[Message],
                  node_of: Callable[[Message], int] | None = None) -> None:
    """Append every reply, as received, to the audit file ``path`` (nothing when ``path`` is None).

    One JSON line per message: ``round``, ``node`` (``node_of(msg)``, by default the sender's node id),
    ``type`` (the message type, e.g. ``"train"``), ``error`` (the error's reason, or null) and ``content``
    (base64 of the serialized content, exactly the bytes Flower carried; null for an error reply).
    """
    if path is None:
        return
    node_of = node_of or (lambda msg: int(msg.metadata.src_node_id))
    with Path(path).open("a") as fh:
        for msg in replies:
            error = msg.has_error()
            row = {"round": int(server_round), "node": int(node_of(msg)), "type": str(msg.metadata.message_type),
                   "error": str(msg.error.reason) if error else None,
                   "content": None if error else base64.b64encode(serialize_content(msg.content)).decode()}
            fh.write(json.dumps(row) + "\n")
