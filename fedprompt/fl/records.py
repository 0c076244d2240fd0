"""What every method's Flower messages share: the record names, the size and bytes of a message, and the
reply audit.

Server -> client: ``"arrays"`` (the method's model: a prompt, soft-prompt weights) and ``"config"`` (at
least ``server-round``). Client -> server: ``"arrays"`` and ``"metrics"`` (numbers only). Each method's
own layout is documented in ``fedprompt/fl/<method>/records.py``. Whatever carries tensors (POST's and RAPT's
soft prompt, BBT's search point) travels through one codec, :func:`prompt_to_arrays` / :func:`arrays_to_prompt`.

The reply audit (``federation.audit_replies=true``): every strategy hands each message it receives from the
clients to :func:`audit_replies` before it looks at it, which appends one JSON line per message to
``<run folder>/replies.jsonl`` (:data:`AUDIT_FILE`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
AUDIT_FILE = "replies.jsonl"
V = TypeVar("V")


# --- typed access: Flower types a lookup as any kind of record (any kind of value); the layout says which -------


R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)


def _record(content: RecordDict, key: str, kind: type[R]) -> R:
    # A reply is untrusted: a record of another kind under the layout's name is a malformed reply (ValueError,
    # which every strategy's check records), not an AttributeError deep inside a codec that stops the server.
    record = content[key]
    if not isinstance(record, kind):
        raise ValueError(f"{key!r} holds a {type(record).__name__} instead of the layout's {kind.__name__}")
    return record


def array_record(content: RecordDict, key: str = ARRAYS) -> ArrayRecord:
    """``content[key]``, the ArrayRecord the message layout puts there (ValueError if it is another kind)."""
    return _record(content, key, ArrayRecord)


def config_record(content: RecordDict, key: str = CONFIG) -> ConfigRecord:
    """``content[key]``, the ConfigRecord the message layout puts there (ValueError if it is another kind)."""
    return _record(content, key, ConfigRecord)


def metric_record(content: RecordDict, key: str = METRICS) -> MetricRecord:
    """``content[key]``, the MetricRecord the message layout puts there (ValueError if it is another kind)."""
    return _record(content, key, MetricRecord)


def record_value(record: ConfigRecord | MetricRecord, key: str, kind: type[V]) -> V:
    """``record[key]``, a ``kind`` (e.g. ``int``, ``list[float]``) by the layout; ``kind`` is for the type checker only."""
    return cast(V, record[key])


def server_round_of(msg: Message) -> int:
    """The ``server-round`` of a server -> client message's config (the strategy sets it)."""
    return int(record_value(config_record(msg.content), "server-round", int))


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


# --- the soft-prompt codec: what carries tensors (POST's and RAPT's soft prompt, BBT's search point) -------------


def prompt_to_arrays(state: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord of a state_dict-like mapping ``{name: tensor or array}``, each as a float32 CPU array."""
    def plain(value) -> np.ndarray:
        if hasattr(value, "detach"):  # a torch tensor (a parameter too)
            value = value.detach().float().cpu().numpy()
        return np.ascontiguousarray(value, dtype=np.float32).copy()

    return ArrayRecord({str(name): Array(plain(value)) for name, value in state.items()})


def arrays_to_prompt(arrays: ArrayRecord, shapes: Mapping[str, Sequence[int | None]]) -> dict[str, np.ndarray]:
    """The ``{name: float32 array}`` of an ArrayRecord made by :func:`prompt_to_arrays`, checked against ``shapes``
    (``{name: shape}``, None for any length on that axis): exactly those names, those shapes, finite values; a
    ValueError names what is wrong."""
    if set(arrays.keys()) != set(shapes):
        raise ValueError(f"the ArrayRecord must carry exactly {sorted(shapes)}, got {sorted(arrays.keys())}")
    out = {}
    for name, shape in shapes.items():
        value = np.asarray(arrays[name].numpy(), dtype=np.float32)
        if value.ndim != len(shape) or any(want is not None and have != want for have, want in zip(value.shape, shape)):
            wanted = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name!r} has shape {tuple(value.shape)}, expected {wanted}")
        if not np.isfinite(value).all():
            raise ValueError(f"{name!r} holds non-finite values")
        out[name] = value.copy()
    return out
