"""RAPT's service side: a soft prompt trained on privatized examples, jointly with privatized-token
reconstruction (Li, Tan, Liu 2023).

Each step takes a batch of privatized examples (plain tokens + text, privatized together by the user),
prepends the soft prompt, runs the frozen model once, and minimises

    loss = CE(label words | answer position)                                   (the task)
         + weight * mean_j CE(plain token j | last hidden state at its position)  (reconstruction)

The reconstruction head maps a hidden state through two linear maps (hidden -> head_dim -> hidden, GELU
between) and scores the result against the model's frozen input embeddings, giving logits over the
vocabulary. Gradients reach the soft prompt through the model, so the prompt learns to make the model
undo the privatization noise; the head is only a training aid and is dropped afterwards: the product is
the soft prompt alone, used on privatized inputs (plain tokens still in front) at inference.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fedprompt.data.task import TaskSpec
from fedprompt.errors import ConfigError
from fedprompt.methods.rapt.config import RAPTConfig
from fedprompt.methods.rapt.inputs import PrivateExample, SlotEncoder
from fedprompt.models.scoring import encode_label_words, forward_logits, length_sorted_batches, position_ids_from_mask
from fedprompt.models.soft_prompt import SoftPrompt


class ReconstructionHead(nn.Module):
    """Two linear maps from a hidden state back to the embedding space; logits = result @ embeddings^T."""

    def __init__(self, hidden_size: int, head_dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, head_dim)
        self.up = nn.Linear(head_dim, hidden_size)

    def forward(self, hidden: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(hidden))) @ vocabulary.T


def first_label_tokens(tokenizer, label_words: Sequence[str]) -> list[int]:
    """The first token of each label word: training and prediction compare these at the answer position."""
    first = [ids[0] for ids in encode_label_words(tokenizer, label_words)]
    if len(set(first)) != len(first):
        raise ConfigError(f"RAPT scores the first token of each label word, and two label words {list(label_words)} "
                          "share their first token; choose label words that start differently")
    return first


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


class RAPTTrainer:
    """The service's RAPT training state: the soft prompt, the head, the privatized examples received."""

    def __init__(self, model, tokenizer, spec: TaskSpec, cfg: RAPTConfig, seed: int = 0) -> None:
        self.model, self.tokenizer, self.spec, self.cfg = model, tokenizer, spec, cfg
        self.device = next(model.parameters()).device
        self.encoder = SlotEncoder(spec, tokenizer)
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
            self._vocabulary = embedding.weight.detach().float()  # frozen: the head's output space
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
        self.examples.extend(examples)

    def train(self, steps: int | None = None) -> dict[str, float]:
        """``steps`` (default ``train.steps``) optimizer steps on random batches of the examples received."""
        if not self.examples:
            raise ConfigError("RAPT has no privatized examples to train on")
        steps = self.cfg.train.steps if steps is None else steps
        start, sums = time.perf_counter(), {}
        self.soft_prompt.train()
        for _ in range(steps):
            size = min(self.cfg.train.batch_size, len(self.examples))
            batch = [self.examples[i] for i in self.rng.choice(len(self.examples), size=size, replace=False)]
            for key, value in self.step(batch).items():
                sums[key] = sums.get(key, 0.0) + value
        self.steps_done += steps
        return {**{k: v / max(steps, 1) for k, v in sums.items()}, "steps": steps, "train_s": time.perf_counter() - start}

    def step(self, batch: Sequence[PrivateExample]) -> dict[str, float]:
        """One optimizer step on ``batch``; returns its losses (and the head's plain-token accuracy)."""
        seqs = [self.encoder.encode(e) for e in batch]
        ids, mask = left_pad(seqs, self.pad_id, self.device)
        embeds, full_mask = self.soft_prompt(self.model.get_input_embeddings()(ids), mask)
        hidden = self.model.base_model(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False,
                                       position_ids=position_ids_from_mask(full_mask)).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[:, -1]).float()[:, self.label_ids]
        labels = torch.tensor([e.label for e in batch], device=self.device)
        task = nn.functional.cross_entropy(logits, labels)
        out = {"task_loss": task.item()}
        loss = task
        if self.head is not None:
            # Row b is left-padded by width - len(seq); its plain tokens start where its text slot starts.
            starts = [self.soft_prompt.num_tokens + ids.shape[1] - len(s) + self.encoder.text_start(e)
                      for s, e in zip(seqs, batch)]
            pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(self.cfg.plain_tokens, device=self.device)
            states = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1])).float()
            rec_logits = self.head(states, self._vocabulary).flatten(0, 1)
            targets = torch.tensor([e.plain for e in batch], device=self.device).flatten()
            rec = nn.functional.cross_entropy(rec_logits, targets)
            loss = task + self.cfg.reconstruction.weight * rec
            out.update(rec_loss=rec.item(), rec_accuracy=(rec_logits.argmax(-1) == targets).float().mean().item())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        out["loss"] = loss.item()
        return out

    @torch.no_grad()
    def predict(self, examples: Sequence[PrivateExample], soft_prompt: SoftPrompt | None = None) -> np.ndarray:
        """Predicted label of each privatized example with ``soft_prompt`` (default: the trained one)."""
        prompt = self.soft_prompt if soft_prompt is None else soft_prompt
        prompt.eval()
        seqs = [self.encoder.encode(e) for e in examples]
        out = np.zeros(len(seqs), dtype=np.int64)
        for idx in length_sorted_batches([len(s) for s in seqs], self.cfg.train.eval_batch_size):
            ids, mask = left_pad([seqs[i] for i in idx], self.pad_id, self.device)
            logits = forward_logits(self.model, ids, mask, prompt, keep_last=1)[:, -1]
            out[idx] = logits[:, self.label_ids].argmax(-1).cpu().numpy()
        return out

    def accuracy(self, examples: Sequence[PrivateExample], soft_prompt: SoftPrompt | None = None) -> float:
        predictions = self.predict(examples, soft_prompt)
        return float(np.mean(predictions == np.array([e.label for e in examples])))
