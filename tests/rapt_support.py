"""Shared pieces of the RAPT tests: the tiny model loaded once per module, and one torch thread.

Tiny-model steps are dominated by thread synchronisation: on a 2-core machine busy with other jobs, two
threads made a 10-step training take 20 s instead of 0.3 s. One thread keeps these tests fast anywhere.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    """(model, tokenizer) of the session's tiny random Llama, float32 on CPU."""
    from fedprompt.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))
