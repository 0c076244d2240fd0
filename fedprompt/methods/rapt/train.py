"""RAPT's service side: a soft prompt trained on privatized examples, jointly with privatized-token
reconstruction (Li, Tan, Liu 2023).

Each step takes a batch of privatized examples (plain tokens + text, privatized together by the user),
prepends the soft prompt, runs the frozen model once, and minimises

    loss = CE(label words | answer position)                                   (the task)
         + weight * mean_j CE(plain token j | last hidden state at its position)  (reconstruction)

The reconstruction head maps a hidden state through two linear maps (hidden -> head_dim -> hidden, GELU
between, on the layer-normed state) and scores the result by cosine against the frozen input embeddings
(logits over the vocabulary). Gradients reach the soft prompt through the model, so the prompt learns to make the model
undo the privatization noise; the head is only a training aid and is dropped afterwards: the product is
the soft prompt alone, used on privatized inputs (plain tokens still in front) at inference.
"""

from __future__ import annotations

import json
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from fedprompt.data.task import TaskSpec
from fedprompt.errors import ConfigError
from fedprompt.methods.rapt.config import RAPTConfig
from fedprompt.methods.rapt.inputs import PrivateExample, SlotEncoder, plain_vocabulary
from fedprompt.models.scoring import cache_kwargs, encode_label_words, length_sorted_batches, output_cache
from fedprompt.models.soft_prompt import SoftPrompt


class ReconstructionHead(nn.Module):
    """Two linear maps (hidden -> head_dim -> hidden, GELU between) from a layer-normed hidden state back
    to the embedding space; the logit of token k is ``scale * cos(result, E[k])``.

    Scoring by cosine keeps the logits in [-scale, scale]: raw dot products of the result with 49k
    embeddings grew so fast under Adam that the loss rose above ln V within 10 steps (measured on SmolLM2).
    """

    def __init__(self, hidden_size: int, head_dim: int, scale: float = 20.0) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, head_dim)
        self.up = nn.Linear(head_dim, hidden_size)
        self.scale = scale

    def forward(self, hidden: torch.Tensor, unit_candidates: torch.Tensor) -> torch.Tensor:
        """Logits over the candidate tokens; ``unit_candidates`` holds their L2-normalised embeddings."""
        x = self.up(nn.functional.gelu(self.down(nn.functional.layer_norm(hidden, hidden.shape[-1:]))))
        return self.scale * nn.functional.normalize(x, dim=-1) @ unit_candidates.T


def first_label_tokens(tokenizer, label_words: Sequence[str]) -> list[int]:
    """The first token of each label word: training and prediction compare these at the answer position."""
    first = [ids[0] for ids in encode_label_words(tokenizer, label_words)]
    if len(set(first)) != len(first):
        raise ConfigError(f"RAPT scores the first token of each label word, and two label words {list(label_words)} "
                          "share their first token; choose label words that start differently")
    return first


class RAPTTrainer:
    """The service's RAPT training state: the soft prompt, the head, the privatized examples received."""

    def __init__(self, model, tokenizer, spec: TaskSpec, cfg: RAPTConfig, seed: int = 0) -> None:
        self.model, self.tokenizer, self.spec, self.cfg = model, tokenizer, spec, cfg
        self.device = next(model.parameters()).device
        self.encoder = SlotEncoder(spec, tokenizer)
        self.prefix_ids = torch.tensor(self.encoder.literals[0], dtype=torch.long, device=self.device)
        self.label_ids = torch.tensor(first_label_tokens(tokenizer, spec.label_words), device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        embedding = model.get_input_embeddings()
        hidden = embedding.weight.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if cfg.prompt.init == "manual":
                self.soft_prompt = SoftPrompt.from_text(spec.manual_prompt, tokenizer, embedding, cfg.prompt.num_tokens)
            else:
                self.soft_prompt = SoftPrompt(cfg.prompt.num_tokens, hidden)
            self.head = ReconstructionHead(hidden, cfg.reconstruction.head_dim) if cfg.reconstruction.enabled else None
        self.soft_prompt.to(self.device)
        groups = [{"params": self.soft_prompt.parameters(), "lr": cfg.train.lr}]
        if self.head is not None:
            self.head.to(self.device)
            groups.append({"params": self.head.parameters(), "lr": cfg.train.head_lr})
            # The head chooses among the tokens plain tokens are drawn from (public), not all 49k.
            candidates = torch.tensor(plain_vocabulary(tokenizer, embedding.weight.shape[0], cfg.reconstruction.plain_vocab),
                                      device=self.device)
            self._candidates = nn.functional.normalize(embedding.weight.detach()[candidates].float(), dim=-1)
            self._candidate_index = torch.full((embedding.weight.shape[0],), -1, dtype=torch.long, device=self.device)
            self._candidate_index[candidates] = torch.arange(candidates.numel(), device=self.device)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.examples: list[PrivateExample] = []
        self.rng = np.random.default_rng(seed)
        self.steps_done = 0

    def add(self, examples: Sequence[PrivateExample]) -> None:
        vocab = self.model.get_input_embeddings().weight.shape[0]
        for e in examples:
            if len(e.plain) != self.cfg.plain_tokens or len(e.ids) < len(e.plain):
                raise ConfigError(f"a privatized example carries {len(e.plain)} plain tokens and {len(e.ids)} ids; "
                                  f"this RAPT config expects {self.cfg.plain_tokens} plain tokens in front of its text")
            if not 0 <= e.label < self.spec.num_labels:
                raise ConfigError(f"a privatized example has label {e.label}; the task has {self.spec.num_labels} labels")
            if any(not 0 <= t < vocab for t in (*e.ids, *(e.pair_ids or ()), *e.plain)):
                raise ConfigError(f"a privatized example holds token ids outside [0, {vocab})")
            if self.head is not None and (self._candidate_index[list(e.plain)] < 0).any():
                raise ConfigError("a privatized example's plain tokens are not in reconstruction.plain_vocab; "
                                  "clients and service must share the reconstruction config")
        self.examples.extend(examples)

    def state(self) -> dict:
        """Everything training changes, as plain objects (a resume restores it with :meth:`load_state`): the soft
        prompt, the head, the optimizer's moments, the batch sampler's RNG, the steps done, the examples pooled."""
        return {"soft_prompt": self.soft_prompt.weight.detach().cpu().clone(),
                "head": None if self.head is None else {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "rng": json.dumps(self.rng.bit_generator.state),
                "steps_done": int(self.steps_done), "examples": list(self.examples)}

    def load_state(self, state: dict) -> None:
        """Continue from a :meth:`state` of a trainer built with the same model, task, config and seed."""
        with torch.no_grad():
            self.soft_prompt.weight.copy_(state["soft_prompt"].to(self.soft_prompt.weight.device))
        if (self.head is None) != (state["head"] is None):
            raise ConfigError("the saved RAPT state and this config disagree on method.reconstruction.enabled")
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.steps_done = int(state["steps_done"])
        self.examples = list(state["examples"])

    def train(self, steps: int | None = None) -> dict[str, float]:
        """``steps`` (default ``train.steps``) optimizer steps on random batches of the examples received."""
        if not self.examples:
            raise ConfigError("RAPT has no privatized examples to train on")
        steps = self.cfg.train.steps if steps is None else steps
        start = time.perf_counter()
        sums: dict[str, float] = {}
        for _ in range(steps):
            size = min(self.cfg.train.batch_size, len(self.examples))
            batch = [self.examples[i] for i in self.rng.choice(len(self.examples), size=size, replace=False)]
            for key, value in self.step(batch).items():
                sums[key] = sums.get(key, 0.0) + value
        self.steps_done += steps
        return {**{k: v / max(steps, 1) for k, v in sums.items()}, "steps": steps, "train_s": time.perf_counter() - start}

    def hidden_states(self, batch: Sequence[PrivateExample], prompt: SoftPrompt | None,
                      encoder: SlotEncoder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states (B, S, H) of each example's tokens after the shared prefix (right-padded), and
        each row's length. The soft prompt and the template before the first slot are the same for every
        example, so they run once and the batch shares their KV cache (gradients flow through it): on
        SST-2/TREC inputs this skips 40-55% of the work. ``prompt=None`` and another ``encoder`` (another
        instruction text in the template): the untuned references."""
        encoder = encoder or self.encoder
        prefix_ids = torch.tensor(encoder.literals[0], dtype=torch.long, device=self.device)
        embed, body = self.model.get_input_embeddings(), self.model.base_model
        prefix = embed(prefix_ids) if prompt is None else torch.cat([prompt.weight.to(embed.weight.dtype), embed(prefix_ids)])
        prefix = prefix[None]  # (1, P, H): run once, its cache shared by the batch
        cache = output_cache(body(inputs_embeds=prefix, use_cache=True))
        cache.batch_repeat_interleave(len(batch))
        rows = [torch.tensor(encoder.encode(e)[len(prefix_ids):], device=self.device) for e in batch]
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_id)
        width = torch.arange(ids.shape[1], device=self.device)
        mask = torch.cat([torch.ones(len(rows), prefix.shape[1], dtype=torch.long, device=self.device),
                          (width[None, :] < lengths[:, None]).long()], 1)
        out = body(inputs_embeds=embed(ids), attention_mask=mask, position_ids=(prefix.shape[1] + width).expand(len(rows), -1),
                   **cache_kwargs(body, cache))
        return out.last_hidden_state, lengths

    def label_logits(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of the label words' first tokens at each row's last position (the answer)."""
        last = hidden[torch.arange(hidden.shape[0], device=self.device), lengths - 1]
        return self.model.get_output_embeddings()(last).float()[:, self.label_ids]

    def step(self, batch: Sequence[PrivateExample]) -> dict[str, float]:
        """One optimizer step on ``batch``; returns its losses (and the head's plain-token accuracy)."""
        hidden, lengths = self.hidden_states(batch, self.soft_prompt)
        labels = torch.tensor([e.label for e in batch], device=self.device)
        task = nn.functional.cross_entropy(self.label_logits(hidden, lengths), labels)
        out = {"task_loss": task.item()}
        loss = task
        if self.head is not None:
            starts = torch.tensor([self.encoder.text_start(e) - len(self.prefix_ids) for e in batch], device=self.device)
            pos = starts[:, None] + torch.arange(self.cfg.plain_tokens, device=self.device)  # the plain tokens' rows
            states = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1])).float()
            rec_logits = self.head(states, self._candidates).flatten(0, 1)
            targets = self._candidate_index[torch.tensor([e.plain for e in batch], device=self.device).flatten()]
            rec = nn.functional.cross_entropy(rec_logits, targets)
            loss = task + self.cfg.reconstruction.weight * rec
            out.update(rec_loss=rec.item(), rec_accuracy=(rec_logits.argmax(-1) == targets).float().mean().item())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        out["loss"] = loss.item()
        return out

    @torch.no_grad()
    def predict(self, examples: Sequence[PrivateExample], soft_prompt: SoftPrompt | None = None,
                untuned: str | None = None) -> np.ndarray:
        """Predicted label of each privatized example with ``soft_prompt`` (default: the trained one), or with no
        soft prompt and the instruction text ``untuned`` in the template (the manual prompt, or "": zero-shot)."""
        prompt = None if untuned is not None else self.soft_prompt if soft_prompt is None else soft_prompt
        encoder = None if untuned is None else SlotEncoder(self.spec, self.tokenizer, untuned)
        out = np.zeros(len(examples), dtype=np.int64)
        sizes = [len(e.ids) + len(e.pair_ids or ()) for e in examples]
        for idx in length_sorted_batches(sizes, self.cfg.train.eval_batch_size):
            hidden, lengths = self.hidden_states([examples[i] for i in idx], prompt, encoder)
            out[idx] = self.label_logits(hidden, lengths).argmax(-1).cpu().numpy()
        return out

    def accuracy(self, examples: Sequence[PrivateExample], soft_prompt: SoftPrompt | None = None) -> float:
        predictions = self.predict(examples, soft_prompt)
        return float(np.mean(predictions == np.array([e.label for e in examples])))
