"""fedprompt: federated, privacy-preserving prompt tuning of LLMs on Flower."""

__version__ = "0.1.0"
