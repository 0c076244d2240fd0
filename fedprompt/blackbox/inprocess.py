"""The black box in the caller's process: the server's engine and accounting without HTTP.

For fast simulation. It checks each request like the server (same limits, same errors), scores with the
same code, charges the same budget rules, and reports the bytes the HTTP client would have put on the
wire for the same call (request and response bodies, chunked the same way), so methods report
comparable numbers whichever client they ran with.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedprompt.blackbox.accounting import Accountant
from fedprompt.blackbox.base import BlackBoxLM, ClassifyResult, Usage
from fedprompt.blackbox.engine import ScoringEngine
from fedprompt.blackbox.protocol import classify_request, classify_response, encode_json
from fedprompt.blackbox.settings import Budget, Limits


class InProcessBlackBox(BlackBoxLM):
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
            self.engine = ScoringEngine(model, tokenizer, limits, batch_size, cache_size,
                                        model_id or getattr(model.config, "name_or_path", "model"))
        self.chunk_size = chunk_size
        self.accountant = Accountant([], budget)
        self.account = self.accountant.authenticate(None)

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    def classify(self, texts: Sequence[str], labels: Sequence[str], labels_only: bool = False) -> ClassifyResult:
        texts = list(texts) if not isinstance(texts, str) else texts
        if len(texts) == 0:
            return ClassifyResult([], None if labels_only else np.zeros((0, len(labels)), np.float32))
        chunks = [texts[i : i + self.chunk_size] for i in range(0, len(texts), self.chunk_size)]
        plans = [self.engine.plan_classify(chunk, labels) for chunk in chunks]  # every check before any work
        cost = Usage()
        for plan in plans:
            cost.add(Usage(requests=1, queries=len(plan.texts), prompt_tokens=plan.prompt_tokens))
        reserved = self.accountant.reserve(self.account, cost)
        try:
            scores = self.engine.classify(texts, labels)  # one call: length-sorted batches over all texts
        except BaseException:
            self.accountant.release(self.account, reserved)
            raise
        for chunk, plan, start in zip(chunks, plans, range(0, len(texts), self.chunk_size)):
            body = classify_response(self.model_id, scores[start : start + len(chunk)], labels_only, plan.prompt_tokens)
            cost.bytes_sent += len(encode_json(classify_request(chunk, labels, labels_only)))
            cost.bytes_received += len(encode_json(body))
        self.accountant.settle(self.account, reserved, cost)
        self.usage.add(cost)
        predictions = [int(i) for i in scores.argmax(axis=1)]
        return ClassifyResult(predictions, None if labels_only else scores, cost)
