"""FedAvg-BBT and FedBPT: federated black-box tuning of a soft prompt P0 + A z with CMA-ES over a
low-dimensional z (BBT, Sun et al. 2022; FedBPT, Sun et al. 2023). Plain Python; the Flower apps
(``fedprompt.fl.bbt``) wrap it. The black box must accept prompt embeddings
(:class:`fedprompt.blackbox.SoftPromptBlackBox`)."""

from fedprompt.methods.bbt.aggregate import fedavg_bbt, fedbpt, weighted_mean
from fedprompt.methods.bbt.config import BBTConfig
from fedprompt.methods.bbt.projection import RandomProjection, bbt_projection_std
from fedprompt.methods.bbt.search import LocalCMA, SearchResult, label_cross_entropy

__all__ = ["BBTConfig", "LocalCMA", "RandomProjection", "SearchResult", "bbt_projection_std", "fedavg_bbt", "fedbpt",
           "label_cross_entropy", "weighted_mean"]
