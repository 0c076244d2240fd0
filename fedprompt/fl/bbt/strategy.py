"""FedAvg-BBT and FedBPT as a Flower strategy: the shared reply loop (fedprompt.fl.strategy), with the
aggregation replaced by the two rules of :mod:`fedprompt.methods.bbt.aggregate`."""

from __future__ import annotations

from flwr.app import ArrayRecord, Message

from fedprompt.fl.bbt.records import arrays_to_point, point_to_arrays
from fedprompt.fl.records import ARRAYS, METRICS
from fedprompt.fl.report import RoundStats
from fedprompt.fl.strategy import FedStrategy
from fedprompt.methods.bbt.aggregate import fedavg_bbt, fedbpt


class BBTStrategy(FedStrategy):
    """Each round the sampled clients get the global (z, sigma); each runs local CMA-ES and replies with
    (z_k, sigma_k) and its example count n_k. Then

    - ``mode="fedavg"`` (FedAvg-BBT): z = sum n_k z_k / sum n_k; sigma stays ``sigma0``;
    - ``mode="fedbpt"`` (FedBPT): z = sum n_k z_k / sum n_k (the clients' CMA means), sigma = sum n_k sigma_k / sum n_k.

    Replies with wrong keys or shapes, non-finite values or no positive n_k are refused.
    """

    kept = "global point"

    def __init__(self, mode: str, intrinsic_dim: int, sigma0: float, **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in ("fedavg", "fedbpt"):
            raise ValueError(f"mode must be fedavg or fedbpt, got {mode!r}")
        self.mode, self.dim, self.sigma0 = mode, int(intrinsic_dim), float(sigma0)

    def invalid(self, msg: Message) -> str | None:
        if reason := self.weighted_layout(msg):
            return reason
        try:
            arrays_to_point(msg.content[ARRAYS], self.dim)
        except ValueError as err:
            return f"malformed reply: {err}"
        return None

    def record(self, stats: RoundStats, valid: list[Message]) -> None:
        stats.aggregation["mode"] = self.mode

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        points = [arrays_to_point(m.content[ARRAYS], self.dim) for m in valid]
        weights = [float(m.content[METRICS][self.weighted_by_key]) for m in valid]
        if self.mode == "fedavg":
            z, sigma = fedavg_bbt([p[0] for p in points], weights), self.sigma0
        else:
            z, sigma = fedbpt([p[0] for p in points], [p[1] for p in points], weights)
        self.rounds[server_round].aggregation.update(sigma=sigma, z_norm=float((z.astype("float64") ** 2).sum() ** 0.5))
        return point_to_arrays(z, sigma)
