"""``SoftPrompt``: trainable prompt vectors prepended to a frozen model's input embeddings.

Kept as its own module (not peft's prompt tuning) so that the prompt is expanded per batch element
inside ``forward``: per-example gradients (Opacus) then see the true batch size.
"""

from __future__ import annotations

import torch
from torch import nn

from fedprompt.errors import ConfigError


class SoftPrompt(nn.Module):
    """``num_tokens`` vectors of the model's hidden size, prepended to every sequence of a batch."""

    def __init__(self, num_tokens: int, hidden_size: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ConfigError(f"a soft prompt needs at least 1 token, got {num_tokens}")
        if init is None:
            init = torch.randn(num_tokens, hidden_size) * 0.02
        if tuple(init.shape) != (num_tokens, hidden_size):
            raise ConfigError(f"soft prompt init has shape {tuple(init.shape)}, expected {(num_tokens, hidden_size)}")
        self.weight = nn.Parameter(init.detach().clone().float())

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_text(cls, text: str, tokenizer, embedding: nn.Embedding, num_tokens: int) -> SoftPrompt:
        """Initialise from the embeddings of ``text``'s tokens, repeated or cut to ``num_tokens``."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"soft prompt init text {text!r} tokenizes to nothing")
        reps = -(-num_tokens // len(ids))
        ids = torch.tensor((ids * reps)[:num_tokens], device=embedding.weight.device)
        with torch.no_grad():
            init = embedding(ids).float().cpu()
        return cls(num_tokens, init.shape[1], init)

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the prompt to ``inputs_embeds`` (B, T, H) and extend ``attention_mask`` (B, T)."""
        batch = inputs_embeds.shape[0]
        prompt = self.weight.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        embeds = torch.cat([prompt, inputs_embeds], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        ones = torch.ones((batch, self.num_tokens), dtype=attention_mask.dtype, device=attention_mask.device)
        return embeds, torch.cat([ones, attention_mask], dim=1)
