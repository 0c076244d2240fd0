"""BBT's fixed random projection from the search space z (d numbers) to a soft prompt (P x H numbers).

    P(z) = P0 + reshape(z @ A, (P, H)),   A in R^{d x (P*H)},  A_ij ~ N(0, sigma_A^2), drawn once from a seed

BBT (Sun et al. 2022, section 3) chooses sigma_A = sigma_e / (sqrt(d) * sigma_z), with sigma_e the standard
deviation of the model's token embeddings and sigma_z the step size CMA-ES starts with (``sigma0``): a
z drawn from N(0, sigma_z^2 I) then moves each prompt entry by about sigma_e, the scale of a real token
embedding. We use that rule unless ``projection_std`` is set. Server and clients build A from the same
seed, so only z (and a step size) ever travels.
"""

from __future__ import annotations

import math

import numpy as np

from fedprompt.errors import ConfigError


def bbt_projection_std(embedding_std: float, intrinsic_dim: int, sigma_z: float) -> float:
    """BBT's sigma_A = sigma_e / (sqrt(d) * sigma_z)."""
    if not embedding_std > 0 or intrinsic_dim < 1 or not sigma_z > 0:
        raise ConfigError(f"cannot scale the projection from embedding std {embedding_std}, d={intrinsic_dim}, "
                          f"sigma_z={sigma_z}: all must be positive")
    return float(embedding_std / (math.sqrt(intrinsic_dim) * sigma_z))


class RandomProjection:
    """z (d,) -> soft prompt (P, H): ``base`` (P0) plus z times a seeded Gaussian matrix."""

    def __init__(self, intrinsic_dim: int, prompt_tokens: int, hidden_size: int, std: float, seed: int,
                 base: np.ndarray | None = None) -> None:
        if min(intrinsic_dim, prompt_tokens, hidden_size) < 1 or not std > 0:
            raise ConfigError(f"a projection needs d, P, H >= 1 and std > 0, got {intrinsic_dim}, {prompt_tokens}, "
                              f"{hidden_size}, {std}")
        self.shape = (prompt_tokens, hidden_size)
        self.intrinsic_dim, self.std, self.seed = intrinsic_dim, float(std), int(seed)
        # float32: d * P * H entries (500 x 50 x 576 = 14.4M, 58 MB) would double in float64 for nothing.
        rng = np.random.default_rng(self.seed)
        self.matrix = rng.standard_normal((intrinsic_dim, prompt_tokens * hidden_size), dtype=np.float32)
        self.matrix *= np.float32(std)
        if base is None:
            base = np.zeros(self.shape, np.float32)
        base = np.asarray(base, dtype=np.float32)
        if base.shape != self.shape:
            raise ConfigError(f"the initial prompt P0 has shape {base.shape}, expected {self.shape}")
        self.base = base

    def prompt(self, z: np.ndarray) -> np.ndarray:
        """The (P, H) float32 soft prompt of ``z``."""
        z = np.asarray(z, dtype=np.float32)
        if z.shape != (self.intrinsic_dim,):
            raise ValueError(f"z must have shape ({self.intrinsic_dim},), got {z.shape}")
        return self.base + (z @ self.matrix).reshape(self.shape)


def projection_for(config, blackbox, manual_prompt: str, run_seed: int) -> RandomProjection:
    """The run's projection, identical on the server and on every client: its size and scale come from
    ``config`` (a BBTConfig) and the black box's :class:`~fedprompt.blackbox.PromptSpace`, its seed from
    ``projection_seed`` (else the run's seed), P0 from the black box's embedding of the init text."""
    space = blackbox.prompt_space()
    std = config.projection_std or bbt_projection_std(space.embedding_std, config.intrinsic_dim, config.sigma0)
    base = None
    if config.init == "text":
        text = config.init_text or manual_prompt
        if not text or not text.strip():
            raise ConfigError("method.init=text but the task has no manual prompt; set method.init_text or init=zeros")
        base = blackbox.text_prompt(text, config.prompt_tokens)
    seed = run_seed if config.projection_seed is None else config.projection_seed
    return RandomProjection(config.intrinsic_dim, config.prompt_tokens, space.hidden_size, std, seed, base)
