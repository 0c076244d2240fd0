"""FedDTPT's client round and server check, and black-box prompt scoring, without Flower (plain objects)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from fedprompt.blackbox.scoring import predict_prompt, score_prompt
from fedprompt.data.task import Example
from fedprompt.methods.feddtpt import FedDTPTConfig
from fedprompt.methods.feddtpt.check import PublicCheck, public_check
from fedprompt.methods.feddtpt.local import LocalSearch, privatize_partitions

SPEC = SimpleNamespace(name="toy", label_words=["no", "yes"], labels=("bad", "good"), manual_prompt="Is it good?",
                       format=lambda e, prompt: f"{prompt} {e.text}|{e.label}")
PUBLIC = [Example("a", 0), Example("b", 1), Example("c", 0), Example("d", 1)]


class CountingBox:
    """Predicts the gold label only when the prompt contains "good"; counts the texts it sees."""

    def __init__(self):
        self.texts, self.labels = [], []

    def classify(self, texts, label_words, labels_only):
        assert labels_only
        self.texts += texts
        self.labels.append(label_words)
        return SimpleNamespace(predictions=[int(t.endswith("|1")) if "good" in t else 0 for t in texts])


def test_predict_prompt_joins_words_and_scores_against_the_labels():
    box = CountingBox()
    assert predict_prompt(box, SPEC, PUBLIC, ["so", "good"]).tolist() == [0, 1, 0, 1]
    assert box.texts[0] == "so good a|0" and box.labels == [["no", "yes"]]
    assert predict_prompt(box, SPEC, PUBLIC, "").tolist() == [0, 0, 0, 0]  # zero-shot: the text as given
    assert score_prompt(box, SPEC, PUBLIC, "good") == (1.0, 4)
    assert score_prompt(box, SPEC, PUBLIC, ["bad"]) == (0.5, 4)


def test_public_check_scores_on_the_public_pool_and_caches_the_old_prompt():
    box = CountingBox()
    check = public_check(box, SPEC, PUBLIC)
    assert isinstance(check, PublicCheck)
    assert check(["good"], ["bad"]) == {"kept": False, "old_accuracy": 1.0, "new_accuracy": 0.5, "examples": 4}
    assert check(["good"], ["good", "too"])["kept"] is True  # a tie or better keeps the merge
    assert len(box.texts) == 12  # "good" was scored once
    assert check.scores == {"good": 1.0, "bad": 0.5, "good too": 1.0}


class RecordingSearch:
    def __init__(self):
        self.calls = []

    def run(self, blackbox, spec, prompt, local, public=(), seed=0, public_seed=None, edit_seed=None):
        self.calls.append({"prompt": list(prompt), "local": local, "public": public, "seed": seed,
                           "public_seed": public_seed, "edit_seed": edit_seed})
        return SimpleNamespace(prompt=list(prompt))


def test_a_client_round_searches_from_the_global_prompt_with_the_rounds_seeds():
    search, box = RecordingSearch(), CountingBox()
    local = LocalSearch(FedDTPTConfig.from_dict({}), search, box)
    local.round(SPEC, ["go"], PUBLIC[:2], PUBLIC[2:], server_round=3, partition_id=1, seed=99, run_seed=7)
    assert search.calls == [{"prompt": ["go"], "local": PUBLIC[:2], "public": PUBLIC[2:], "seed": 99, "public_seed": None,
                             "edit_seed": None}]
    shared = LocalSearch(FedDTPTConfig.from_dict({"search": {"public_shared": True, "shared_edits": True}}), search, box)
    shared.round(SPEC, ["go"], PUBLIC, (), server_round=3, partition_id=1, seed=99, run_seed=7)
    assert (search.calls[-1]["public_seed"], search.calls[-1]["edit_seed"]) == ((7, 3), (7, 3, 1))  # no partition in them


def test_with_mixed_seed_prompts_each_client_starts_round_one_from_its_own_style():
    method = FedDTPTConfig.from_dict({"seed_prompt": {"style": "mixed"}})
    local = LocalSearch(method, RecordingSearch(), CountingBox())
    starts = [local.start_prompt(SPEC, ["global"], 1, i) for i in range(3)]
    assert starts == [method.initial_prompt(SPEC, i) for i in range(3)] and len({" ".join(s) for s in starts}) == 3
    assert local.start_prompt(SPEC, ["global"], 2, 1) == ["global"]  # later rounds: the global prompt
    plain = LocalSearch(FedDTPTConfig.from_dict({}), RecordingSearch(), CountingBox())
    assert plain.start_prompt(SPEC, ["global"], 1, 1) == ["global"]


def test_every_partition_is_privatized_with_its_own_seed_and_empty_ones_stay_empty():
    class Marker:
        def privatize_examples(self, examples, tokenizer, seed):
            return [Example(f"{e.text}@{seed}", e.label) for e in examples]

    out = privatize_partitions([PUBLIC[:1], [], PUBLIC[1:2]], Marker(), None, lambda i: 10 * i)
    assert out == [[Example("a@0", 0)], [], [Example("b@20", 1)]]
    assert np.all([isinstance(p, list) for p in out])
