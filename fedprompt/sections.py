"""The run-level config sections the Flower layer reads (``federation``, ``deploy``), declared here, below it, so
that fedprompt.schema can type them and fedprompt.config can register their defaults without importing fl
(docs/architecture.md, the layers)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from fedprompt.errors import ConfigError

# Upper bounds: a typo (rounds=1000000000) or a value no run can meet would otherwise start and run for ever.
MAX_COUNT = 100_000           # clients, rounds, replies, evaluation interval
MAX_EXAMPLES = 1_000_000_000  # example limits and the public pool
MAX_TIMEOUT_S = 30 * 24 * 3600


@dataclass(frozen=True)
class FederationConfig:
    """The ``federation`` node (conf/federation/default.yaml): a Flower simulation's clients, rounds, sampling
    and evaluation. Every method's server honours every key alike (fedprompt.fl.rounds.RoundDriver)."""

    num_clients: int = 10  # simulated SuperNodes (flwr num-supernodes); client i holds partition i
    rounds: int = 3  # federated rounds; round 0 is the seed prompt, evaluated before any training
    fraction_train: float = 1.0  # share of clients sampled per round (FedDTPT paper: full participation)
    min_train_clients: int = 1  # at least this many clients per round, whatever fraction_train gives
    min_replies: int = 1  # valid replies a round needs; fewer (failed, timed-out, lost clients): round skipped, prompt kept
    min_available_clients: int | None = None  # SuperNodes online before a round samples (null = num_clients); lower = survive lost ones
    client_cpus: int = 1  # Ray CPUs per ClientApp: 1 on a 2-core machine lets two clients search at once
    client_gpus: float = 0.0  # share of a GPU per ClientApp (e.g. 0.25 = four clients per GPU)
    round_timeout_s: float = 3600.0  # how long the server waits for the round's replies
    eval_split: str = "test"  # the server evaluates the global prompt on this split after every round
    eval_limit: int | None = None  # only N examples of eval_split (null = all of them): the first N, or a seeded sample
    eval_sample_seed: int | None = None  # null = the first eval_limit examples; an int = a seeded sample of them
    eval_every: int = 1  # score the global prompt every k rounds (round 0 and the last round always)
    eval_references: bool = True  # also score the untuned references (manual prompt, zero-shot) on the same examples
    reference_limit: int | None = 500  # validation examples that decide the reference (the better of manual and zero-shot); null = all
    eval_overlap: str = "refuse"  # learning rows equal to evaluation rows: refuse = stop before launch; exclude = drop them first
    public_split: str = "validation"  # the small public set every client may use (never a client's data, never eval_split's examples)
    public_size: int = 64  # public pool (class-balanced); each search batch draws method.search.public_batch_size of it
    audit_replies: bool = False  # every method: write every client-to-server message, as received, to <run folder>/replies.jsonl
    superlink_port: int = 0  # the private local SuperLink's port on 127.0.0.1 (0 = any free port)

    def validate(self) -> None:
        def within(key: str, low: int, high: float, optional: bool = False) -> None:
            value = getattr(self, key)
            if value is None and optional:
                return
            # comparisons, not float(): nan fails both, and an int too large for a float still compares
            if value is None or not low <= value <= high:
                upper = f" and <= {high}" if high < math.inf else ""
                null = " (or null)" if optional else ""
                raise ConfigError(f"federation.{key} must be >= {low}{upper}{null}, got {value}")

        for key in ("num_clients", "rounds", "min_train_clients", "min_replies", "eval_every"):
            within(key, 1, MAX_COUNT)
        within("client_cpus", 1, 1024)
        within("client_gpus", 0, 1024)
        within("round_timeout_s", 1, MAX_TIMEOUT_S)
        within("public_size", 0, MAX_EXAMPLES)
        within("eval_limit", 1, MAX_EXAMPLES, optional=True)
        within("reference_limit", 1, MAX_EXAMPLES, optional=True)
        within("eval_sample_seed", 0, math.inf, optional=True)  # numpy refuses a negative seed, mid-run
        within("superlink_port", 0, 65535)  # else the SuperLink fails to bind, after the run folder exists
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"federation.fraction_train must be in (0, 1], got {self.fraction_train}")
        sampled = min(self.num_clients, max(math.ceil(self.fraction_train * self.num_clients), self.min_train_clients))
        if self.min_replies > sampled:
            raise ConfigError(f"federation.min_replies={self.min_replies} but a round samples only {sampled} clients: "
                              "every round would be skipped; lower min_replies or raise fraction_train / "
                              "min_train_clients")
        available = self.min_available_clients
        if available is not None and not 1 <= available <= self.num_clients:
            raise ConfigError(f"federation.min_available_clients must be in 1..num_clients={self.num_clients} "
                              f"(or null for all of them), got {available}")
        from fedprompt.data.leakage import OVERLAP_POLICIES

        if self.eval_overlap not in OVERLAP_POLICIES:
            raise ConfigError(f"federation.eval_overlap must be one of {' | '.join(OVERLAP_POLICIES)}, got "
                              f"{self.eval_overlap!r}")
        # public_split == eval_split is allowed (stage 1 of the result protocol scores on validation, where the
        # public pool lives too): the pool is then drawn from that split minus the evaluation examples (fl.data).
        if self.public_split == "train" and self.public_size > 0:
            raise ConfigError("federation.public_split=train would hand clients' training data to everyone; use "
                              "validation")


@dataclass(frozen=True)
class DeploySettings:
    """The ``deploy`` config group."""

    connection: str | None = None
    certs_dir: str | None = None
    superlink_port: int = 0
    service_port: int = 0
    startup_timeout_s: float = 180.0

    @classmethod
    def from_config(cls, cfg: DictConfig) -> DeploySettings:
        """The ``deploy`` node, validated (fedprompt.typed_config.from_node)."""
        from fedprompt.typed_config import from_node

        return from_node(cls, cfg.get("deploy"), "deploy")

    def validate(self) -> None:
        for key in ("superlink_port", "service_port"):
            port = getattr(self, key)
            if not 0 <= port <= 65535:
                raise ConfigError(f"deploy.{key} must be a port in 0..65535 (0 = any free port), got {port!r}")
        if self.startup_timeout_s <= 0:
            raise ConfigError(f"deploy.startup_timeout_s must be > 0, got {self.startup_timeout_s!r}")
