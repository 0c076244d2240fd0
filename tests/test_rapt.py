"""RAPT's algorithm without Flower: config, user-side privatization, the service's inputs and training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedprompt.config import compose
from fedprompt.data.task import Example, TaskSpec
from fedprompt.errors import ConfigError
from fedprompt.fl.rapt import arrays_to_examples, examples_to_arrays
from fedprompt.methods.rapt import PrivateExample, RAPTConfig, RAPTTrainer, SlotEncoder, privatize_examples, text_ids
from fedprompt.privacy.dchi import DChiPrivatizer, output_vocabulary
from tests.conftest import SHARED_DATA
from tests.rapt_support import one_thread, tiny_lm  # noqa: F401 - fixtures

CHATML = "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}"
SPEC = TaskSpec("toy", ("negative", "positive"), (" negative", " positive"), "{prompt}\n\nReview: {text}",
                "Is it positive or negative?", "Sentiment:", CHATML)
PAIR_SPEC = TaskSpec("toypair", ("yes", "no"), (" great", " terrible"), "{prompt}\nPremise: {text}\nHypothesis: {text_pair}",
                     "Does it follow?", "Answer:", CHATML, is_pair=True)
EXAMPLES = [Example("a great movie with a wonderful cast", 1), Example("a terrible film , boring and too long", 0),
            Example("wonderful cast", 1), Example("boring and too long", 0)] * 4


def make_privatizer(model, tokenizer, eta: float) -> DChiPrivatizer:
    embedding = model.get_input_embeddings().weight.detach()
    return DChiPrivatizer(embedding, eta, output_vocabulary(tokenizer, embedding.shape[0]))


def config(**sections) -> RAPTConfig:
    node = {"privatize": {"eta": 5.0}, "reconstruction": {"plain_tokens": 4}, "prompt": {"num_tokens": 3},
            "train": {"steps": 2, "batch_size": 4, "lr": 0.01, "head_lr": 0.01}}
    for key, value in sections.items():
        node[key] = {**node.get(key, {}), **value}
    return RAPTConfig.from_dict(node)


def test_the_shipped_config_composes_and_validates():
    method = RAPTConfig.from_dict(compose(["method=rapt"]).method)
    assert method.privatize.eta == 30 and method.reconstruction.enabled and method.plain_tokens == 16
    assert config(reconstruction={"enabled": False}).plain_tokens == 0
    assert math.isinf(RAPTConfig.from_dict(config(privatize={"eta": math.inf}).to_dict()).privatize.eta)


@pytest.mark.parametrize("node, match", [
    ({"privatize": {"eta": None}}, "RAPT privatizes every text"),
    ({"privatize": {"eta": 5, "epsilon": 1}}, "unknown config key 'method.privatize.epsilon'"),
    ({"privatize": {"eta": 5}, "train": {"steps": 2.5}}, "method.train.steps must be a whole number"),
    ({"privatize": {"eta": 5}, "train": {"steps": "40"}}, "method.train.steps must be a whole number"),
    ({"privatize": {"eta": 5}, "train": {"stepz": 2}}, "unknown config key 'method.train.stepz'"),
    ({"privatize": {"eta": 5}, "reconstruction": {"weight": 0.0}}, "weight must be > 0"),
    ({"privatize": {"eta": 5}, "reconstruction": {"enabled": "yes"}}, "method.reconstruction.enabled must be true or false"),
    ({"privatize": {"eta": 5}, "prompt": {"init": "vocab"}}, "prompt.init"),
    ({"privatize": {"eta": 5}, "trian": {}}, "unknown config key 'method.trian'.*did you mean 'method.train'"),
    ({"name": "feddtpt", "privatize": {"eta": 5}}, "this config is for 'rapt'"),
])
def test_config_is_strict(node, match):
    with pytest.raises(ConfigError, match=match):
        RAPTConfig.from_dict(node)


@pytest.mark.parametrize("spec", [SPEC, PAIR_SPEC])
def test_slot_encoding_matches_tokenizing_the_whole_input(tiny_lm, spec):
    _, tokenizer = tiny_lm
    example = Example("a great movie", 1, "who wrote hamlet ?" if spec.is_pair else None)
    private = PrivateExample(tuple(text_ids(tokenizer, example.text, 64)), 1,
                             tuple(text_ids(tokenizer, example.text_pair, 64)) if spec.is_pair else None)
    encoder = SlotEncoder(spec, tokenizer)
    assert encoder.encode(private) == tokenizer(spec.format(example))["input_ids"]
    start = encoder.text_start(private)
    assert encoder.encode(private)[start : start + len(private.ids)] == list(private.ids)


def test_users_send_fresh_plain_tokens_and_privatized_text(tiny_lm):
    model, tokenizer = tiny_lm
    pairs = [Example("premise one", 0, "hypothesis one"), Example("premise two", 1, "hypothesis two")]
    private, raw = privatize_examples(pairs, tokenizer, make_privatizer(model, tokenizer, 0.05), 64, seed=0, plain_tokens=4)
    assert [len(e.plain) for e in private] == [4, 4] and private[0].plain != private[1].plain
    assert len(set(private[0].plain)) == 4  # distinct within an example
    assert [len(e.ids) for e in private] == [len(r) for r in raw[:2]] and raw[0][:4] == list(private[0].plain)
    assert [len(e.pair_ids) for e in private] == [len(r) for r in raw[2:]]
    assert all(e.ids[4:] != tuple(r[4:]) for e, r in zip(private, raw))  # strong noise: the text changed
    clean, _ = privatize_examples(pairs, tokenizer, make_privatizer(model, tokenizer, math.inf), 64, seed=0, plain_tokens=4)
    assert [tokenizer.decode(e.ids[4:]).strip() for e in clean] == ["premise one", "premise two"]


@pytest.mark.parametrize("spec", [SPEC, PAIR_SPEC])
def test_shared_prefix_cache_gives_the_hidden_states_of_a_full_forward(tiny_lm, spec):
    model, tokenizer = tiny_lm
    examples = [Example("a great movie with a wonderful cast", 1, "who wrote hamlet ?"), Example("boring", 0, "no")]
    examples = [e if spec.is_pair else Example(e.text, e.label) for e in examples]
    private, _ = privatize_examples(examples, tokenizer, make_privatizer(model, tokenizer, 5.0), 64, seed=0, plain_tokens=4)
    trainer = RAPTTrainer(model, tokenizer, spec, config(), seed=0)
    with torch.no_grad():
        trainer.soft_prompt.weight.normal_()  # a prompt unlike any token, so a misplaced prompt would show
        hidden, lengths = trainer.hidden_states(private, trainer.soft_prompt)
        for row, e in enumerate(private):
            ids = torch.tensor([trainer.encoder.encode(e)])
            embeds, _ = trainer.soft_prompt(model.get_input_embeddings()(ids))
            full = model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]
            skip = trainer.soft_prompt.num_tokens + len(trainer.prefix_ids)
            assert lengths[row] == full.shape[0] - skip
            torch.testing.assert_close(hidden[row, : lengths[row]], full[skip:], atol=1e-5, rtol=1e-4)


def test_training_learns_reconstruction_and_returns_only_the_prompt(tiny_lm):
    model, tokenizer = tiny_lm
    cfg = config(privatize={"eta": math.inf}, train={"steps": 30})
    private, _ = privatize_examples(EXAMPLES, tokenizer, make_privatizer(model, tokenizer, math.inf), 64, seed=0,
                                    plain_tokens=cfg.plain_tokens)
    trainer = RAPTTrainer(model, tokenizer, SPEC, cfg, seed=0)
    trainer.add(private)
    start = trainer.soft_prompt.weight.detach().clone()
    first = trainer.train(steps=3)
    later = trainer.train()
    assert later["rec_loss"] < first["rec_loss"] - 0.5  # the head learns to read the plain tokens back
    assert {"task_loss", "rec_loss", "rec_accuracy", "loss", "steps", "train_s"} <= set(later)
    assert not torch.equal(start, trainer.soft_prompt.weight)
    assert all(p.grad is None for p in model.parameters())  # the model stays frozen
    assert 0.0 <= trainer.accuracy(private) <= 1.0
    assert trainer.steps_done == 33


def test_without_reconstruction_there_is_no_head_and_no_plain_tokens(tiny_lm):
    model, tokenizer = tiny_lm
    cfg = config(reconstruction={"enabled": False})
    private, _ = privatize_examples(EXAMPLES, tokenizer, make_privatizer(model, tokenizer, 5.0), 64, seed=0)
    trainer = RAPTTrainer(model, tokenizer, SPEC, cfg, seed=0)
    assert trainer.head is None and all(e.plain == () for e in private)
    trainer.add(private)
    assert set(trainer.train()) == {"task_loss", "loss", "steps", "train_s"}
    with pytest.raises(ConfigError, match="plain tokens"):
        RAPTTrainer(model, tokenizer, SPEC, config(), seed=0).add(private)  # expects 4 plain tokens


def test_the_trainer_rejects_bad_examples(tiny_lm):
    model, tokenizer = tiny_lm
    trainer = RAPTTrainer(model, tokenizer, SPEC, config(), seed=0)
    with pytest.raises(ConfigError, match="label"):
        trainer.add([PrivateExample((5, 6, 7, 8, 9), 7, None, (5, 6, 7, 8))])
    with pytest.raises(ConfigError, match="outside"):
        trainer.add([PrivateExample((5, 6, 7, 8, 10**6), 1, None, (5, 6, 7, 8))])
    small = RAPTTrainer(model, tokenizer, SPEC, config(reconstruction={"plain_vocab": 10}), seed=0)
    with pytest.raises(ConfigError, match="plain_vocab"):  # plain tokens the service's head cannot choose among
        small.add([PrivateExample((200, 201, 202, 203, 9), 1, None, (200, 201, 202, 203))])
    assert trainer.examples == []
    with pytest.raises(ConfigError, match="no privatized examples"):
        trainer.train()


@pytest.mark.parametrize("pair", [False, True])
def test_reply_records_round_trip(pair):
    rng = np.random.default_rng(0)
    examples = [PrivateExample(tuple(rng.integers(0, 99, 4 + i).tolist()), i % 2,
                               tuple(rng.integers(0, 99, i).tolist()) if pair else None, tuple(rng.integers(0, 99, 4).tolist()))
                for i in range(5)]
    assert arrays_to_examples(examples_to_arrays(examples, 4)) == examples
    assert arrays_to_examples(examples_to_arrays([], 4)) == []
    broken = examples_to_arrays(examples, 4)
    del broken["labels"]
    with pytest.raises(ValueError, match="lacks"):
        arrays_to_examples(broken)


@pytest.mark.e2e
@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="needs ../shared/data")
def test_rapt_on_smollm2_and_sst2():
    """The real service model: its embeddings privatize SST-2 text, one RAPT step runs, predictions come out."""
    from fedprompt.models import load_causal_lm, load_tokenizer
    from fedprompt.runs.data import load_task_and_spec

    cfg = compose(["method=rapt", "task=sst2", f"data_dir={SHARED_DATA}"])
    task, spec = load_task_and_spec(cfg)
    examples = task.split("validation")[:4]
    model, tokenizer = load_causal_lm("smollm2-135m", "cpu", "auto"), load_tokenizer("smollm2-135m")
    method = RAPTConfig.from_dict(cfg.method)
    for eta, lo, hi in ((math.inf, 1.0, 1.0), (30.0, 0.1, 0.5)):  # eta=30 leaves ~28% of SST-2 tokens as they were
        private, raw = privatize_examples(examples, tokenizer, make_privatizer(model, tokenizer, eta), 64, seed=0,
                                          plain_tokens=method.plain_tokens, plain_vocab=method.reconstruction.plain_vocab)
        same = np.mean([a == b for e, r in zip(private, raw) for a, b in zip(e.ids[16:], r[16:])])
        assert lo <= same <= hi
    trainer = RAPTTrainer(model, tokenizer, spec, method, seed=0)
    trainer.add(private)
    stats = trainer.train(steps=1)
    assert math.isfinite(stats["loss"]) and stats["rec_loss"] > 0
    assert set(trainer.predict(private).tolist()) <= {0, 1}


def test_round_shares_split_the_partition_once_and_every_example_leaves_once():
    from fedprompt.methods.rapt.user import round_share

    items = list(range(10))
    shares = [round_share(items, 3, r, seed=5) for r in (1, 2, 3)]
    assert sorted(sum(shares, [])) == items and [len(s) for s in shares] == [4, 3, 3]
    assert round_share(items, 3, 4, seed=5) == []  # after the last round: nothing
    assert round_share(items, 3, 2, seed=5) == shares[1]  # the same shuffle every round (and after a resume)


def test_a_user_sends_its_rounds_share_privatized_with_the_runs_settings(tiny_lm):
    from fedprompt.methods.rapt.user import RAPTUser

    model, tokenizer = tiny_lm
    method = config()
    clear = RAPTUser(method, tokenizer, make_privatizer(model, tokenizer, math.inf))
    sent = clear.send(EXAMPLES, 2, 1, shuffle_seed=3, seed=0)
    assert len(sent.examples) == 8 and sent.tokens_unchanged == 1.0
    assert sent.tokens == sum(len(e.ids) - method.plain_tokens for e in sent.examples)
    assert all(len(e.plain) == method.plain_tokens for e in sent.examples)
    assert clear.privatize(EXAMPLES[:2], 0)[0] == privatize_examples(EXAMPLES[:2], tokenizer, clear.privatizer, 64, seed=0,
                                                                      plain_tokens=4, plain_vocab=method.reconstruction.plain_vocab)[0]
    noisy = RAPTUser(method, tokenizer, make_privatizer(model, tokenizer, 0.05)).send(EXAMPLES, 2, 1, shuffle_seed=3, seed=0)
    assert noisy.tokens == sent.tokens and noisy.tokens_unchanged < 0.5
    assert clear.send(EXAMPLES, 2, 3, shuffle_seed=3, seed=0) == type(sent)([], 0, 0.0)
