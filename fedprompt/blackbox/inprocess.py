"""The black box in the caller's process: the server's engine and accounting without HTTP.

For fast simulation. It checks each request like the server (same limits, same errors), scores with the
same code, charges the same budget rules, and reports the bytes the HTTP client would have put on the
wire for the same call (request and response bodies, chunked the same way), so methods report
comparable numbers whichever client they ran with. It is also a :class:`SoftPromptBlackBox`: it scores
continuous prompts (``classify_embeds``, for BBT / FedBPT) with the same scorer and the same accounting.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedprompt.blackbox.accounting import Accountant
from fedprompt.blackbox.base import ClassifyResult, PromptSpace, SoftPromptBlackBox, Usage
from fedprompt.blackbox.engine import ScoringEngine
from fedprompt.blackbox.errors import ValidationFailed
from fedprompt.blackbox.protocol import classify_request, classify_response, encode_json
from fedprompt.blackbox.settings import Budget, Limits
from fedprompt.ties import pick_labels


class InProcessBlackBox(SoftPromptBlackBox):
    """``model``: a registry name / HF id / folder (loaded here), a loaded causal LM (pass ``tokenizer``),
    or a :class:`ScoringEngine` to share with a server in the same process."""

    def __init__(self, model="smollm2-135m", tokenizer=None, *, device: str | None = "auto", dtype: str | None = "auto",
                 batch_size: int = 16, chunk_size: int = 128, limits: Limits = Limits(), budget: Budget = Budget(),
                 cache_size: int = 0, model_id: str | None = None) -> None:
        super().__init__()
        if chunk_size > limits.max_batch:
            raise ValueError(f"chunk_size {chunk_size} is over limits.max_batch {limits.max_batch}")
        if isinstance(model, ScoringEngine):
            self.engine = model
        else:
            if isinstance(model, str):
                from fedprompt.models.registry import load_causal_lm, load_tokenizer

                model_id = model_id or model
                tokenizer = tokenizer or load_tokenizer(model)
                model = load_causal_lm(model, device, dtype)
            elif tokenizer is None:
                raise ValueError("InProcessBlackBox: pass the tokenizer with a loaded model")
            if not model_id:
                model_id = getattr(model.config, "name_or_path", "model")
            self.engine = ScoringEngine(model, tokenizer, limits, batch_size, cache_size, model_id)
        self.chunk_size = chunk_size
        self.accountant = Accountant([], budget)
        self.account = self.accountant.authenticate(None)
        self._space: PromptSpace | None = None

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    def classify(self, texts: Sequence[str], labels: Sequence[str], labels_only: bool = False) -> ClassifyResult:
        return self._classify(texts, labels, labels_only, None)

    def classify_embeds(self, texts: Sequence[str], labels: Sequence[str], soft_prompt: np.ndarray) -> ClassifyResult:
        """``classify`` with ``soft_prompt`` (P, H) prepended to every text's embeddings; log-probs always.

        The bytes sent are those of a JSON classify request that also carries the prompt as a nested list
        of floats (what an HTTP service taking prompt embeddings would receive)."""
        prompt = np.asarray(soft_prompt, dtype=np.float32)
        hidden = self.prompt_space().hidden_size
        if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] != hidden:
            raise ValidationFailed(f"soft_prompt must be a (tokens, {hidden}) matrix, got shape {prompt.shape}",
                                   param="soft_prompt")
        if not np.isfinite(prompt).all():
            raise ValidationFailed("soft_prompt holds NaN or infinite values", param="soft_prompt")
        return self._classify(texts, labels, False, prompt)

    def prompt_space(self) -> PromptSpace:
        if self._space is None:
            weight = self.engine.model.get_input_embeddings().weight
            self._space = PromptSpace(int(weight.shape[1]), float(weight.float().std()))
        return self._space

    def text_prompt(self, text: str, num_tokens: int) -> np.ndarray:
        from fedprompt.models.soft_prompt import SoftPrompt

        prompt = SoftPrompt.from_text(text, self.engine.tokenizer, self.engine.model.get_input_embeddings(), num_tokens)
        return prompt.weight.detach().numpy().astype(np.float32)

    def _classify(self, texts: Sequence[str], labels: Sequence[str], labels_only: bool,
                  soft_prompt: np.ndarray | None) -> ClassifyResult:
        texts = list(texts) if not isinstance(texts, str) else texts
        if len(texts) == 0:
            return ClassifyResult([], None if labels_only else np.zeros((0, len(labels)), np.float32))
        prefix = 0 if soft_prompt is None else soft_prompt.shape[0]
        chunks = [texts[i : i + self.chunk_size] for i in range(0, len(texts), self.chunk_size)]
        plans = [self.engine.plan_classify(chunk, labels, prefix) for chunk in chunks]  # every check before any work
        cost = Usage()
        for plan in plans:
            cost.add(Usage(requests=1, queries=len(plan.texts), prompt_tokens=plan.prompt_tokens))
        reserved = self.accountant.reserve(self.account, cost)
        try:
            if soft_prompt is None:
                scores = self.engine.classify(texts, labels)  # one call: length-sorted batches over all texts
            else:
                scores = self.engine.classify_prompted(texts, labels, soft_prompt)
        except BaseException:
            self.accountant.release(self.account, reserved)
            raise
        extra = {} if soft_prompt is None else {"soft_prompt": soft_prompt.tolist()}
        for chunk, plan, start in zip(chunks, plans, range(0, len(texts), self.chunk_size)):
            body = classify_response(self.model_id, scores[start : start + len(chunk)], labels_only, plan.prompt_tokens, chunk)
            cost.bytes_sent += len(encode_json({**classify_request(chunk, labels, labels_only), **extra}))
            cost.bytes_received += len(encode_json(body))
        self.accountant.settle(self.account, reserved, cost)
        self.usage.add(cost)
        predictions = [int(i) for i in pick_labels(scores, texts)[0]]  # exact ties: the server's rule
        return ClassifyResult(predictions, None if labels_only else scores, cost)
