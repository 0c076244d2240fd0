"""FedAvg-BBT and FedBPT on Flower: the message layout, the strategy, the client and the server (the round
template's :class:`~fedprompt.fl.rounds.MethodServer`). The CMA-ES search is plain Python in fedprompt.methods.bbt.

Messages. Server -> client: ``"arrays"`` {``"z"``: float32 (d,), ``"sigma"``: float32 (1,)}, the global search
point (FedBPT: the global CMA mean) and the step size the clients start CMA-ES with (FedAvg-BBT: always
``method.sigma0``; FedBPT: the aggregated one), and ``"config"`` {``"server-round"``}. Client -> server: the same
arrays (its best z or its final CMA mean, per ``method.client_return``; FedBPT: its final mean; and its final step
size) and ``"metrics"`` (numbers only, :data:`REPLY_METRICS`). Only d + 1 numbers go up: the projection A and P0
are rebuilt from the shared seed on every side. A client's examples, labels and CMA-ES covariance stay on it; its
``context.state`` holds :data:`STATE`, its cumulative queries over the run.

Round 0 is z = 0 (the prompt P0) with step size ``method.sigma0``. The server scores P0 + A z through its own
soft-prompt black box and saves the final point and prompt (``bbt_prompt.npz``). Each client's CMA-ES is seeded
per (seed, round, partition), so a resumed run repeats the same rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.supercore import log

from fedprompt.errors import ConfigError
from fedprompt.fl.client import ClientRound, PerRun, reply, usage_metrics
from fedprompt.fl.records import array_record, arrays_to_prompt, metric_record, prompt_to_arrays, record_value
from fedprompt.fl.rounds import MethodServer, Scored, serve
from fedprompt.fl.strategy import FedStrategy
from fedprompt.methods.bbt.aggregate import fedavg_bbt, fedbpt
from fedprompt.runs.report import RoundStats

if TYPE_CHECKING:
    from fedprompt.blackbox import SoftPromptBlackBox
    from fedprompt.methods.bbt.config import BBTConfig
    from fedprompt.methods.bbt.search import LocalCMA
    from fedprompt.runs.data import ClientData

Z, SIGMA = "z", "sigma"
STATE = "bbt"
PROMPT_FILE = "bbt_prompt.npz"
NEEDS_EMBEDS = "BBT needs a service that accepts prompt embeddings; use service.kind=inprocess"

REPLY_METRICS = (
    "num-examples",       # the client's training examples: the aggregation weight
    "partition-id",       # which client this is
    "queries",            # texts scored by the black box this round (batch x candidates)
    "queries-total",      # the same, cumulative over the run (kept in context.state)
    "loss",               # lowest candidate loss (label cross-entropy on its batch)
    "last-loss",          # mean candidate loss of the last CMA-ES iteration
    "iterations",         # CMA-ES iterations run (fewer than method.local_iterations if CMA-ES converged)
    "evaluations",        # candidates scored
    "bb-requests", "bb-prompt-tokens", "bb-bytes-sent", "bb-bytes-received",  # the black box's accounting
    "search-s",           # wall time of the local search
)


def point_to_arrays(z: np.ndarray, sigma: float) -> ArrayRecord:
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 1 or not np.isfinite(z).all() or not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"a search point is a finite vector and a positive step size, got shape {z.shape}, sigma {sigma}")
    return prompt_to_arrays({Z: z, SIGMA: [sigma]})


def arrays_to_point(arrays: ArrayRecord, dim: int | None = None) -> tuple[np.ndarray, float]:
    """(z, sigma) of an ArrayRecord; a ValueError when it is malformed (wrong keys, shapes, values)."""
    point = arrays_to_prompt(arrays, {Z: (dim,), SIGMA: (1,)})
    if not point[SIGMA][0] > 0:
        raise ValueError(f"sigma must be one positive number, got {point[SIGMA].tolist()}")
    return point[Z], float(point[SIGMA][0])


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
        return self.weighted_layout(msg, lambda arrays: arrays_to_point(arrays, self.dim))

    def record(self, stats: RoundStats, valid: list[Message]) -> None:
        stats.aggregation["mode"] = self.mode

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        points = [arrays_to_point(array_record(m.content), self.dim) for m in valid]
        weights = [float(record_value(metric_record(m.content), self.weighted_by_key, float)) for m in valid]
        if self.mode == "fedavg":
            z, sigma = fedavg_bbt([p[0] for p in points], weights), self.sigma0
        else:
            z, sigma = fedbpt([p[0] for p in points], [p[1] for p in points], weights)
        self.rounds[server_round].aggregation.update(sigma=sigma, z_norm=float((z.astype("float64") ** 2).sum() ** 0.5))
        return point_to_arrays(z, sigma)


def soft_prompt_blackbox(cfg):
    """The black box of ``service.kind``, which must take prompt embeddings (a ConfigError otherwise)."""
    from fedprompt.blackbox import SoftPromptBlackBox, make_blackbox

    if str(cfg.service.kind) != "inprocess":
        raise ConfigError(f"{NEEDS_EMBEDS} (got service.kind={cfg.service.kind})")
    blackbox = make_blackbox(cfg)
    if not isinstance(blackbox, SoftPromptBlackBox):
        blackbox.close()
        raise ConfigError(f"{NEEDS_EMBEDS} ({type(blackbox).__name__} takes texts only)")
    return blackbox


# --- the client --------------------------------------------------------------------------------------------------


@dataclass
class BBTClientState:
    method: BBTConfig
    data: ClientData
    blackbox: SoftPromptBlackBox
    search: LocalCMA  # holds the projection


def _build(cfg, node_config) -> BBTClientState:
    from fedprompt.methods.bbt import LocalCMA
    from fedprompt.methods.bbt.projection import projection_for
    from fedprompt.runs.data import client_data
    from fedprompt.runs.run_config import method_config

    method = method_config(cfg)
    data = client_data(cfg, node_config)
    blackbox = soft_prompt_blackbox(cfg)
    projection = projection_for(method, blackbox, data.spec.manual_prompt, int(cfg.seed))
    return BBTClientState(method, data, blackbox, LocalCMA(method, projection))


CLIENT = PerRun(_build, release=lambda old: old.blackbox.close())


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's local CMA-ES in one round; raises on failure (the ClientApp turns that into an error reply)."""
    state = CLIENT.get(context, cfg)
    method, data = state.method, state.data
    now = ClientRound.of(msg, context, cfg, len(data.partition.clients))
    examples = data.partition.clients[now.partition_id]
    z, sigma = arrays_to_point(array_record(msg.content), method.intrinsic_dim)
    result = state.search.run(state.blackbox, [data.spec.format(e) for e in examples], [e.label for e in examples],
                              list(data.spec.label_words), z, sigma, seed=now.seed)
    if method.mode == "fedavg":
        point = result.best_z if method.client_return == "best" else result.mean
    else:  # fedbpt: the client's distribution
        point = result.mean
    total = int(record_value(metric_record(context.state, STATE), "queries-total", int)) if STATE in context.state else 0
    context.state[STATE] = MetricRecord({"queries-total": total + result.queries})
    return reply(msg, point_to_arrays(point, result.sigma), {
        "num-examples": len(examples), "partition-id": now.partition_id, "queries": result.queries,
        "queries-total": total + result.queries, "loss": result.best_loss, "last-loss": result.losses[-1],
        "iterations": result.iterations, "evaluations": result.evaluations, **usage_metrics(result.usage),
        "search-s": result.seconds})


# --- the server --------------------------------------------------------------------------------------------------


def check(cfg, spec) -> dict:
    """Checks before launch: the service takes embeddings, label words, the prompt fits the model's context."""
    from transformers import AutoConfig

    from fedprompt.methods.post.tuning import check_prompt_fits
    from fedprompt.models import encode_label_words, load_tokenizer, materialize
    from fedprompt.runs.data import client_data
    from fedprompt.runs.run_config import method_config

    method = method_config(cfg)
    if str(cfg.service.kind) != "inprocess":
        raise ConfigError(f"{NEEDS_EMBEDS} (got service.kind={cfg.service.kind})")
    name = str(cfg.model.name)
    tokenizer = load_tokenizer(name)  # also converts an embedded model once, before the clients start
    encode_label_words(tokenizer, spec.label_words)
    model_config = AutoConfig.from_pretrained(materialize(name))
    clients = client_data(cfg).partition.clients
    longest = max(len(ids) for c in clients for ids in tokenizer([spec.format(e) for e in c])["input_ids"])
    check_prompt_fits(method.prompt_tokens, longest, getattr(model_config, "max_position_embeddings", None))
    hidden = int(model_config.hidden_size)
    return {"prompt_dim": method.prompt_tokens * hidden,
            "queries_per_client_round_max": method.evaluations_per_round() * (method.batch_size or max(map(len, clients)))}


class BBTServer(MethodServer):
    """Scores P0 + A z through the server's own soft-prompt black box."""

    def __init__(self, cfg, method, task, spec, examples) -> None:
        from fedprompt.methods.bbt.projection import projection_for

        super().__init__(cfg, method, task, spec, examples)
        self.blackbox = soft_prompt_blackbox(cfg)
        self.usage = self.blackbox.usage
        self.projection = projection_for(method, self.blackbox, spec.manual_prompt, int(cfg.seed))

    def strategy(self, **common) -> BBTStrategy:
        return BBTStrategy(self.method.mode, self.method.intrinsic_dim, self.method.sigma0, **common)

    def info(self) -> dict:
        method = self.method
        return {"mode": method.mode, "service": str(self.cfg.service.kind), "intrinsic_dim": method.intrinsic_dim,
                "prompt_tokens": method.prompt_tokens, "init": method.init, "popsize": method.popsize,
                "local_iterations": method.local_iterations, "batch_size": method.batch_size,
                "projection_std": self.projection.std, "projection_seed": self.projection.seed}

    def untuned(self, rows, text):  # the manual prompt or no instruction, without a soft prompt
        from fedprompt.blackbox.scoring import predict_prompt

        return predict_prompt(self.blackbox, self.spec, rows, text)

    def initial_arrays(self) -> ArrayRecord:
        return point_to_arrays(np.zeros(self.method.intrinsic_dim, np.float32), self.method.sigma0)

    def score(self, server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        z, sigma = arrays_to_point(arrays, self.method.intrinsic_dim)
        log(INFO, "round %d: the global prompt's |z| %.3f, sigma %.4f", server_round, float(np.linalg.norm(z)), sigma)
        if not due:
            return Scored()
        texts = [self.spec.format(e) for e in self.examples]  # with the task's manual prompt
        result = self.blackbox.classify_embeds(texts, list(self.spec.label_words), self.projection.prompt(z))
        return Scored(predictions=np.asarray(result.predictions), queries=len(self.examples))

    def save(self, folder: Path, arrays: ArrayRecord) -> dict:
        z, sigma = arrays_to_point(arrays, self.method.intrinsic_dim)
        np.savez(folder / PROMPT_FILE, z=z, sigma=np.float32(sigma), prompt=self.projection.prompt(z))
        return {"prompt_file": str(folder / PROMPT_FILE), "final_sigma": sigma}

    def close(self) -> None:
        self.blackbox.close()


def run_server(grid, cfg) -> dict:
    return serve(grid, cfg, BBTServer)
