"""End to end on the embedded SmolLM2-135M: 8 SST-2 validation examples, formatted with the task's
template, through the real server over HTTP and the OpenAI-compatible client, against in-process."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedprompt.blackbox import HttpBlackBox, InProcessBlackBox, OpenAICompatibleBlackBox
from fedprompt.config import compose
from fedprompt.data import load_task
from fedprompt.models import load_causal_lm, load_tokenizer, score_label_words
from tests.blackbox_support import serving
from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="needs ../shared/data")]


def test_clients_agree_on_smollm2_sst2():
    cfg = compose(["task=sst2", "model=smollm2-135m", f"data_dir={SHARED_DATA}"])
    task = load_task(OmegaConf.to_container(cfg.task, resolve=True), str(SHARED_DATA))
    spec = task.spec.with_chat_format(cfg.model.chat_format)
    examples = task.split("validation")[:8]
    texts, labels = [spec.format(e) for e in examples], list(spec.label_words)
    # float32: the clients batch the texts differently, and bf16 rounding would blur the comparison.
    model, tok = load_causal_lm("smollm2-135m", "cpu", "float32"), load_tokenizer("smollm2-135m")
    truth = score_label_words(model, tok, texts, labels)

    local = InProcessBlackBox(model, tok, model_id="smollm2-135m").classify(texts, labels)
    np.testing.assert_array_equal(local.logprobs, truth)
    with serving(model, tok, model_id="smollm2-135m") as server:
        with HttpBlackBox(server.url, chunk_size=3) as http:
            remote = http.classify(texts, labels)
        with OpenAICompatibleBlackBox(server.url, "smollm2-135m", chunk_size=5) as openai:  # no tokenizer: prefix match
            first_token = openai.classify(texts, labels)
    np.testing.assert_allclose(remote.logprobs, truth, atol=1e-4)
    # " negative" and " positive" are single tokens, always in the top-20 after "Sentiment:": exact.
    assert not first_token.floored.any()
    np.testing.assert_allclose(first_token.logprobs, truth, atol=1e-4)
    assert local.predictions == remote.predictions == first_token.predictions == truth.argmax(1).tolist()
    assert np.mean(np.array(local.predictions) == [e.label for e in examples]) >= 0.5  # the model reads SST-2
