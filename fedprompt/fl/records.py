"""What every method's Flower messages share: the record names, and the size and bytes of a message.

Server -> client: ``"arrays"`` (the method's model: a prompt, soft-prompt weights) and ``"config"`` (at
least ``server-round``). Client -> server: ``"arrays"`` and ``"metrics"`` (numbers only). Each method's
own layout is documented in ``fedprompt/fl/<method>/records.py``.
"""

from __future__ import annotations

from flwr.app import RecordDict

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


def record_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content (Flower's protobuf encoding): the bytes on the wire."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())


def serialize_content(content: RecordDict) -> bytes:
    """The exact bytes a message's content is sent as (for the reply audit)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()
