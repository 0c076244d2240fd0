"""FedAvg-BBT and FedBPT: federated black-box tuning of a soft prompt P0 + A z with CMA-ES over a
low-dimensional z (BBT, Sun et al. 2022; FedBPT, Sun et al. 2023). Plain Python; the Flower apps
(``fedprompt.fl.bbt``) wrap it. The black box must accept prompt embeddings
(:class:`fedprompt.blackbox.SoftPromptBlackBox`)."""

from __future__ import annotations

from fedprompt.lazy import lazy_exports

# name -> the submodule that defines it; imported on first use (PEP 562), so that importing one submodule
# (e.g. the torch-free config, for composing a config) does not import the others.
_EXPORTS = {
    "fedavg_bbt": "fedprompt.methods.bbt.aggregate",
    "fedbpt": "fedprompt.methods.bbt.aggregate",
    "weighted_mean": "fedprompt.methods.bbt.aggregate",
    "BBTConfig": "fedprompt.methods.bbt.config",
    "RandomProjection": "fedprompt.methods.bbt.projection",
    "bbt_projection_std": "fedprompt.methods.bbt.projection",
    "LocalCMA": "fedprompt.methods.bbt.search",
    "SearchResult": "fedprompt.methods.bbt.search",
    "label_cross_entropy": "fedprompt.methods.bbt.search",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
