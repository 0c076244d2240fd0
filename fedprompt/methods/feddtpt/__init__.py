"""FedDTPT (Wu et al. 2024): client-side discrete prompt search against a black-box LM, and the
server's similarity-weighted, DBSCAN-clustered aggregation. Plain Python; the Flower apps wrap it."""

from fedprompt.methods.feddtpt.aggregate import AggregationResult, Embedder, FedDTPTAggregator, SentenceEmbedder, knee_eps
from fedprompt.methods.feddtpt.config import (
    AggregateConfig,
    FedDTPTConfig,
    ProposerConfig,
    SearchConfig,
    SeedPromptConfig,
)
from fedprompt.methods.feddtpt.proposers import (
    EmbeddingNeighbourProposer,
    LMInfillProposer,
    MLMProposer,
    Proposer,
    RandomProposer,
    build_proposer,
    whole_word_vocab,
)
from fedprompt.methods.feddtpt.search import Edit, PromptSearch, SearchResult

__all__ = [
    "AggregateConfig",
    "AggregationResult",
    "Edit",
    "Embedder",
    "EmbeddingNeighbourProposer",
    "FedDTPTAggregator",
    "FedDTPTConfig",
    "LMInfillProposer",
    "MLMProposer",
    "PromptSearch",
    "Proposer",
    "ProposerConfig",
    "RandomProposer",
    "SearchConfig",
    "SearchResult",
    "SeedPromptConfig",
    "SentenceEmbedder",
    "build_proposer",
    "knee_eps",
    "whole_word_vocab",
]
