"""FedDTPT (Wu et al. 2024): client-side discrete prompt search against a black-box LM, and the
server's similarity-weighted, DBSCAN-clustered aggregation. Plain Python; the Flower apps wrap it."""

from __future__ import annotations

from fedprompt.lazy import lazy_exports

# name -> the submodule that defines it; imported on first use (PEP 562), so that importing one submodule
# (e.g. the torch-free config, for composing a config) does not import the others.
_EXPORTS = {
    "AggregationResult": "fedprompt.methods.feddtpt.aggregate",
    "Embedder": "fedprompt.methods.feddtpt.aggregate",
    "FedDTPTAggregator": "fedprompt.methods.feddtpt.aggregate",
    "SentenceEmbedder": "fedprompt.methods.feddtpt.aggregate",
    "knee_eps": "fedprompt.methods.feddtpt.aggregate",
    "AggregateConfig": "fedprompt.methods.feddtpt.config",
    "FedDTPTConfig": "fedprompt.methods.feddtpt.config",
    "ProposerConfig": "fedprompt.methods.feddtpt.config",
    "SearchConfig": "fedprompt.methods.feddtpt.config",
    "SeedPromptConfig": "fedprompt.methods.feddtpt.config",
    "EmbeddingNeighbourProposer": "fedprompt.methods.feddtpt.proposers",
    "LMInfillProposer": "fedprompt.methods.feddtpt.proposers",
    "MLMProposer": "fedprompt.methods.feddtpt.proposers",
    "Proposer": "fedprompt.methods.feddtpt.proposers",
    "RandomProposer": "fedprompt.methods.feddtpt.proposers",
    "build_proposer": "fedprompt.methods.feddtpt.proposers",
    "whole_word_vocab": "fedprompt.methods.feddtpt.proposers",
    "Edit": "fedprompt.methods.feddtpt.search",
    "PromptSearch": "fedprompt.methods.feddtpt.search",
    "SearchResult": "fedprompt.methods.feddtpt.search",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
