"""Shared fixtures: a tiny randomly initialised Llama with its own small tokenizer (no download), tiny
task folders in the shared format, and the path of the shared data for the end-to-end tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("FEDPROMPT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")

CORPUS = [
    "a great movie with a wonderful cast", "a terrible film , boring and too long", "positive negative neutral",
    "what is the capital of france ?", "who wrote hamlet ?", "how many legs does a spider have ?",
    "stocks fell as oil prices rose", "the team won the championship game", "new phone released today",
    "Review: Sentiment: Answer: Question: Topic: Premise: Hypothesis: yes no", "<|im_start|>user assistant",
]


def make_tiny_model(folder: Path, vocab_size: int = 300) -> Path:
    """Write a tiny Llama (2 layers, hidden 32) and a byte-level BPE tokenizer trained on CORPUS."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_task(root: Path, name: str, rows: dict[str, list[dict]], labels: list[str]) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps({"task": name, "labels": labels}))
    for split, split_rows in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    return folder


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A data folder with a 2-label task 'toy' (12 rows a split) and a pair task 'toypair'."""
    # Each split has its own sentences (a suffix per split): runs check their learning sets against the
    # evaluation split by content and refuse an overlap.
    words = ["a great movie", "a terrible film", "wonderful cast", "boring and too long"]
    suffix = {"train": "", "validation": "v", "test": "t"}
    rows = {s: [{"text": words[i % 4] + f" {p}{i}", "label": (i % 4) % 2} for i in range(12)] for s, p in suffix.items()}
    write_task(tmp_path, "toy", rows, ["negative", "positive"])
    pairs = {s: [{"text": f"premise {p}{i}", "text_pair": f"hypothesis {i}", "label": i % 2} for i in range(8)]
             for s, p in suffix.items()}
    write_task(tmp_path, "toypair", pairs, ["yes", "no"])
    return tmp_path


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Bad input must be refused before any model loads or any simulation starts: both raise here."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or a simulation started before the input was validated")

    monkeypatch.setattr("fedprompt.models.load_causal_lm", refuse)
    monkeypatch.setattr("fedprompt.commands.launch.local_superlink", refuse)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests never write to the user's cache except the embedded model's copy, which they share.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # The CLI exports a command-line service.api_key into this process (fedprompt.redact): undone after each test.
    monkeypatch.delenv("FEDPROMPT_API_KEY", raising=False)
    # The user's config folder (fedprompt.config.user_conf_dir): none of the developer's own task files.
    monkeypatch.delenv("FEDPROMPT_CONF_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
