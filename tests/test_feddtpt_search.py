"""FedDTPT client search against a fake deterministic black box, and the proposers on tiny models."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedprompt.blackbox.base import BlackBoxLM, ClassifyResult, Usage
from fedprompt.data.task import Example, TaskSpec
from fedprompt.errors import ConfigError
from fedprompt.methods.feddtpt import (
    EmbeddingNeighbourProposer,
    LMInfillProposer,
    MLMProposer,
    PromptSearch,
    Proposer,
    ProposerConfig,
    RandomProposer,
    SearchConfig,
    build_proposer,
    whole_word_vocab,
)

SPEC = TaskSpec(name="toy", labels=("neg", "pos"), label_words=(" neg", " pos"), template="{prompt}\n\nText: {text}",
                manual_prompt="Is the text neg or pos?", answer_prefix="Answer:")
SEP, END = "\n\nText: ", "\nAnswer:"  # how SPEC.format lays a text out (default chat_format "{user}\n{answer}")
START = ["please", "label", "this", "text"]
# What the fake model "likes" in a prompt. "meh" lowers every margin by 0.01 without crossing any
# example's difficulty (multiples of 1/32), so it ties in accuracy and loses in margin.
BONUS = {"excellent": 0.5, "superb": 0.25, "awful": -0.25, "meh": -0.01}

LOCAL = [Example(f"SECRET-LOCAL-{i} words", i % 2) for i in range(12)]
PUBLIC = [Example(f"public-{i}", i % 2) for i in range(20)]
BATCH = 12 + 4  # all 12 local examples + a balanced public batch of 4


class FakeBlackBox(BlackBoxLM):
    """Example j (of N known texts) is right iff its difficulty j/N < prompt quality = 0.3 + bonuses."""

    def __init__(self, examples, give_logprobs: bool = True) -> None:
        super().__init__()
        self.gold = {e.text: e.label for e in examples}
        self.difficulty = {e.text: j / len(examples) for j, e in enumerate(examples)}
        self.give_logprobs = give_logprobs
        self.calls: list[tuple[list[str], list[str], bool]] = []

    def classify(self, texts, labels, labels_only=False) -> ClassifyResult:
        self.calls.append((list(texts), list(labels), labels_only))
        preds, logprobs = [], []
        for text in texts:
            prompt, rest = text.split(SEP, 1)
            example = rest[: -len(END)]
            quality = 0.3 + sum(BONUS.get(w, 0.0) for w in prompt.split())
            gold, margin = self.gold[example], quality - self.difficulty[example]
            preds.append(gold if margin > 0 else 1 - gold)
            row = np.zeros(2, dtype=np.float32)
            row[gold] = margin
            logprobs.append(row)
        usage = Usage(requests=1, queries=len(texts))
        self.usage.add(usage)
        lp = None if labels_only or not self.give_logprobs else np.stack(logprobs)
        return ClassifyResult(preds, lp, usage)


class ListProposer(Proposer):
    """Offers its words in a fixed order; records every call (the proposer's view of the client)."""

    def __init__(self, words) -> None:
        self.words, self.calls = list(words), []

    def propose(self, left, right, current, n, exclude=(), rng=None):
        out = [w for w in self.words if w != current and w not in exclude][:n]
        self.calls.append((list(left), list(right), current, set(exclude), out))
        return out


def run(cfg: SearchConfig, proposer, bb=None, seed=0, prompt=START):
    bb = bb or FakeBlackBox(LOCAL + PUBLIC)
    return PromptSearch(cfg, proposer).run(bb, SPEC, prompt, LOCAL, PUBLIC, seed=seed), bb


def replay(start, history):
    """Apply the accepted edits of a history to the start prompt."""
    tokens = list(start)
    for e in history:
        if not e.accepted:
            continue
        if e.op == "insert":
            tokens.insert(e.position, e.new)
        elif e.op == "delete_span":
            assert tokens[e.position : e.position + e.span] == e.old.split()
            del tokens[e.position : e.position + e.span]
        else:
            assert tokens[e.position] == e.old
            if e.op == "delete":
                del tokens[e.position]
            else:
                tokens[e.position] = e.new
    return tokens


def cfg(**kw) -> SearchConfig:
    base = dict(budget=BATCH * 41, local_batch_size=12, public_batch_size=4, candidates_per_step=4)
    return SearchConfig(**{**base, **kw})


def test_search_finds_an_improving_edit():
    result, bb = run(cfg(edit_ops={"replace": 1.0}), ListProposer(["alpha", "beta", "excellent", "gamma"]))
    assert "excellent" in result.prompt
    assert result.accuracy > result.start_accuracy
    assert result.queries == bb.usage.queries == result.usage.queries <= BATCH * 41


@pytest.mark.parametrize("accept", ["improve", "no-drop"])
def test_accuracy_feedback_never_accepts_a_worse_prompt(accept):
    # "awful" is always offered first and lowers accuracy; the start prompt holds "superb" to lose.
    start = ["superb", "label", "this", "text"]
    result, _ = run(cfg(accept=accept), ListProposer(["awful", "alpha", "beta", "gamma", "delta"]), prompt=start)
    current, ties = result.start_accuracy, False
    for step in sorted({e.step for e in result.history}):
        edits = [e for e in result.history if e.step == step]
        accepted = [e for e in edits if e.accepted]
        best = max(e.accuracy for e in edits)
        assert len(accepted) <= 1
        if accepted:
            assert accepted[0].accuracy == best
            assert best > current if accept == "improve" else best >= current
            ties |= best == current
            current = best
        else:
            assert best <= current if accept == "improve" else best < current
    assert ties == (accept == "no-drop")  # the neutral words "alpha".."delta" tie: only no-drop takes them
    assert any(not e.accepted and e.accuracy < result.start_accuracy for e in result.history)  # rejections happened
    assert "awful" not in result.prompt and "superb" in result.prompt
    assert result.accuracy == current >= result.start_accuracy
    assert replay(start, result.history) == result.prompt


@pytest.mark.parametrize("feedback", ["accuracy", "margin", "none"])
@pytest.mark.parametrize("budget", [2 * BATCH + 7, 5 * BATCH - 1, 333])
def test_query_budget_is_never_exceeded(feedback, budget):
    proposer = RandomProposer([f"w{i}" for i in range(50)] + ["excellent"])
    result, bb = run(cfg(budget=budget, feedback=feedback, public_batch_size=4), proposer, seed=3)
    assert bb.usage.queries == result.queries <= budget
    assert result.usage.queries == result.queries
    assert sum(len(texts) for texts, _, _ in bb.calls) == result.queries


def test_resampled_batches_rescore_the_current_prompt_within_budget():
    local = LOCAL + [Example(f"SECRET-LOCAL-{i} more", i % 2) for i in range(12, 24)]
    bb = FakeBlackBox(local + PUBLIC)
    config = cfg(resample_batch=True, local_batch_size=6, public_batch_size=2, budget=8 * 20)
    result = PromptSearch(config, ListProposer(["alpha", "excellent", "beta"])).run(bb, SPEC, START, local, PUBLIC, seed=2)
    assert result.queries == bb.usage.queries <= 8 * 20
    batches = [frozenset(t.split(SEP, 1)[1] for t in texts if "SECRET" in t) for texts, _, _ in bb.calls]
    assert len(set(batches)) > 1  # different local batches
    # Calls alternate: the current prompt alone on a fresh batch (8 texts), then that step's candidates.
    sizes = [len(texts) for texts, _, _ in bb.calls]
    assert len(sizes) >= 4 and all(sizes[i] == 8 for i in range(0, len(sizes), 2))
    assert all(len({t.split(SEP)[0] for t in bb.calls[i][0]}) == 1 for i in range(0, len(sizes), 2))


def test_a_shared_public_seed_gives_clients_the_same_public_batch():
    def public_batches(seed, public_seed):
        bb = FakeBlackBox(LOCAL + PUBLIC)
        config = cfg(resample_batch=True, local_batch_size=6, public_batch_size=4, budget=10 * 20)
        PromptSearch(config, ListProposer(["alpha", "beta"])).run(bb, SPEC, START, LOCAL, PUBLIC, seed=seed,
                                                                  public_seed=public_seed)
        return [sorted({t.split(SEP, 1)[1] for t in texts if "public-" in t}) for texts, _, _ in bb.calls]

    shared_a, shared_b = public_batches(1, (0, 1)), public_batches(2, (0, 1))
    n = min(len(shared_a), len(shared_b))
    assert n >= 2 and shared_a[:n] == shared_b[:n]  # two clients, one sequence of public batches
    assert public_batches(1, None) != public_batches(2, None)  # unshared: each client draws its own


def test_a_shared_edit_seed_gives_clients_the_same_edits_to_try():
    # The fake model likes no word here, so no edit is ever kept and the prompts stay equal: with a shared
    # edit seed two clients (other seeds, so other local batches) try exactly the same edits in order.
    def tried(seed, edit_seed):
        bb = FakeBlackBox(LOCAL + PUBLIC)
        config = cfg(local_batch_size=6, public_batch_size=4, budget=10 * 40, candidates_per_step=2)
        proposer = RandomProposer(["alpha", "beta", "gamma", "delta", "omega"])
        PromptSearch(config, proposer).run(bb, SPEC, START, LOCAL, PUBLIC, seed=seed, edit_seed=edit_seed)
        return [sorted({t.split(SEP, 1)[0] for t in texts}) for texts, _, _ in bb.calls]

    a, b = tried(1, (0, 1, 1)), tried(2, (0, 1, 1))
    assert len(a) >= 5 and a == b
    assert tried(1, None) != tried(2, None)  # unshared: each client explores on its own


def test_tried_pairs_are_skipped_and_the_search_stops_when_all_are_tried():
    proposer = ListProposer(["alpha", "beta", "gamma"])
    result, _ = run(cfg(edit_ops={"replace": 1.0}, budget=BATCH * 200, candidates_per_step=2), proposer)
    triples = [(e.position, e.old, e.new) for e in result.history]
    assert len(triples) == len(set(triples))
    assert result.queries < BATCH * 200  # stopped early: every (position, word, candidate) was tried
    # The proposer is told what was already tried at a slot for the word there now (replace-only:
    # positions never shift), so it is never asked for the same words twice.
    returned: dict[tuple, set] = {}
    for left, _, current, exclude, out in proposer.calls:
        key = (len(left), current)
        assert returned.get(key, set()) <= exclude
        returned.setdefault(key, set()).update(out)


def test_search_is_deterministic_given_its_seed():
    make = lambda: RandomProposer([f"w{i}" for i in range(40)] + ["excellent", "superb"])  # noqa: E731
    a, _ = run(cfg(), make(), seed=7)
    b, _ = run(cfg(), make(), seed=7)
    c, _ = run(cfg(), make(), seed=8)
    assert a.history == b.history and a.prompt == b.prompt and a.queries == b.queries
    assert a.history != c.history


def test_insert_and_delete_edits_keep_history_consistent_and_length_bounded():
    proposer = RandomProposer([f"w{i}" for i in range(30)] + ["excellent", "superb"])
    config = cfg(edit_ops={"replace": 0.2, "insert": 0.4, "delete": 0.4}, feedback="none", max_steps=60,
                 min_tokens=2, max_tokens=6)
    result, _ = run(config, proposer, seed=1)
    assert {e.op for e in result.history} == {"replace", "insert", "delete"}
    assert replay(START, result.history) == result.prompt
    assert 2 <= len(result.prompt) <= 6


def test_feedback_none_accepts_every_edit_and_only_scores_start_and_end():
    proposer = RandomProposer([f"w{i}" for i in range(30)])
    result, bb = run(cfg(feedback="none", edit_ops={"replace": 1.0}), proposer)
    assert result.history and all(e.accepted and e.accuracy is None for e in result.history)
    assert result.steps == len(result.history) == (41 - 1 - 1) // 4  # what a feedback run's budget pays for
    assert result.queries == 2 * BATCH and len(bb.calls) == 2
    assert all(labels_only for _, _, labels_only in bb.calls)


class TiltingBlackBox(FakeBlackBox):
    """The fake model, except that a prompt holding "always" makes it answer label 1 for everything."""

    def classify(self, texts, labels, labels_only=False):
        result = super().classify(texts, labels, labels_only)
        tilted = [SEP.join(t.split(SEP)[:1]).split().count("always") > 0 for t in texts]
        result.predictions = [1 if tilt else p for tilt, p in zip(tilted, result.predictions)]
        return result


def test_balanced_feedback_ignores_a_tilt_toward_the_local_majority():
    # A client whose examples are mostly label 1: answering 1 always raises its batch accuracy but not the
    # mean recall over classes; "excellent" raises both. Difficulties alternate between the labels.
    local = [Example(f"SECRET-SKEW-{i}", 1 if i < 10 else 0) for i in range(12)]
    ones, zeros = [e for e in local + PUBLIC if e.label == 1], [e for e in local + PUBLIC if e.label == 0]
    by_difficulty = [e for pair in zip(ones, zeros) for e in pair] + ones[len(zeros):]
    config = cfg(edit_ops={"replace": 1.0}, budget=BATCH * 12, candidates_per_step=1)

    def search(feedback, words):  # START: batch accuracy ~0.56, mean recall ~0.71; "always": 0.75 and 0.5
        search = PromptSearch(replace(config, feedback=feedback), ListProposer(words))
        return search.run(TiltingBlackBox(by_difficulty), SPEC, START, local, PUBLIC)

    assert "always" in search("accuracy", ["always"]).prompt
    tilted = search("balanced", ["always"])
    assert "always" not in tilted.prompt and tilted.history and not any(e.accepted for e in tilted.history)
    assert "excellent" in search("balanced", ["always", "excellent"]).prompt


def test_margin_feedback_uses_logprobs_and_breaks_accuracy_ties():
    # With accept=no-drop, accuracy feedback keeps an edit that ties; margin feedback rejects it.
    plain, _ = run(cfg(feedback="accuracy", accept="no-drop", edit_ops={"replace": 1.0}, max_steps=3), ListProposer(["meh"]))
    assert "meh" in plain.prompt
    result, bb = run(cfg(feedback="margin", accept="no-drop", edit_ops={"replace": 1.0}, max_steps=3), ListProposer(["meh"]))
    assert all(not labels_only for _, _, labels_only in bb.calls)
    assert result.history and all(e.margin is not None and not e.accepted for e in result.history)
    assert all(e.accuracy == result.start_accuracy for e in result.history) and "meh" not in result.prompt
    better, _ = run(cfg(feedback="margin", edit_ops={"replace": 1.0}, max_steps=3), ListProposer(["meh", "superb"]))
    assert "superb" in better.prompt
    with pytest.raises(ConfigError, match="log-probs"):
        run(cfg(feedback="margin"), ListProposer(["superb"]), bb=FakeBlackBox(LOCAL + PUBLIC, give_logprobs=False))


def test_only_allowed_texts_reach_the_black_box_and_no_local_text_leaves_otherwise():
    vocab = ["alpha", "beta", "excellent", "superb", "gamma"]
    proposer = ListProposer(vocab)
    result, bb = run(cfg(), proposer)
    allowed = {e.text: e for e in LOCAL + PUBLIC}
    sent_local = set()
    for texts, labels, _ in bb.calls:
        assert labels == list(SPEC.label_words)
        for text in texts:
            prompt, rest = text.split(SEP, 1)
            example = allowed[rest[: -len(END)]]  # KeyError: a text that is not one of the batch examples
            assert text == SPEC.format(example, prompt)  # exactly the task's template, nothing added
            assert set(prompt.split()) <= set(START) | set(vocab)
            if example in LOCAL:
                sent_local.add(example.text)
    assert sent_local == {e.text for e in LOCAL}
    # The proposer (which may be remote for 'mlm' users) and the upload payload never see local text.
    assert "SECRET" not in repr(proposer.calls)
    assert "SECRET" not in json.dumps(result.to_dict())


def test_bad_inputs_fail_before_any_query():
    bb = FakeBlackBox(LOCAL + PUBLIC)
    with pytest.raises(ConfigError, match="budget"):
        SearchConfig(budget=10, local_batch_size=16, public_batch_size=4).validate()
    search = PromptSearch(cfg(), ListProposer(["alpha"]))
    with pytest.raises(ConfigError, match="min_tokens"):
        SearchConfig(min_tokens=-1).validate()
    with pytest.raises(Exception, match="no local examples"):
        search.run(bb, SPEC, START, [])
    assert bb.calls == []


def test_span_deletion_reaches_the_empty_prompt_when_every_word_hurts():
    start = ["awful", "awful", "awful", "awful", "awful"]  # each lowers the fake model's quality
    config = cfg(edit_ops={"replace": 0.1, "delete_span": 1.0}, budget=BATCH * 12)
    result, bb = run(config, ListProposer([]), prompt=start)
    assert result.prompt == [] and result.accuracy > result.start_accuracy
    assert replay(start, result.history) == []
    assert {e.op for e in result.history if e.accepted} == {"delete_span"}
    assert all(e.span >= 2 and len(e.old.split()) == e.span for e in result.history if e.op == "delete_span")
    assert result.queries <= config.budget and sum(len(c[0]) for c in bb.calls) == result.queries


def test_span_deletion_respects_min_tokens():
    start = ["awful", "awful", "please", "label", "this", "text"]
    result, _ = run(cfg(edit_ops={"replace": 0.1, "delete_span": 1.0}, min_tokens=2), ListProposer([]), prompt=start)
    assert "awful" not in result.prompt and len(result.prompt) >= 2 and result.accuracy > result.start_accuracy


def test_an_empty_start_prompt_is_zero_shot_and_can_only_grow():
    result, bb = run(cfg(), ListProposer(["excellent", "alpha"]), prompt=[])
    assert result.start_accuracy is not None and all(e.op == "insert" for e in result.history[:4])
    assert result.prompt[:1] == ["excellent"] and result.accuracy > result.start_accuracy
    first_texts = bb.calls[0][0]
    assert first_texts[0].startswith(SEP)  # the start prompt was scored as the empty instruction


# ---- proposers on tiny models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from fedprompt.models.registry import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))


def test_whole_word_vocab_keeps_word_start_tokens_of_letters(tiny_lm):
    _, tok = tiny_lm
    words, ids = whole_word_vocab(tok, min_len=2)
    assert words and len(words) == len(set(words))
    for word, idx in zip(words, ids):
        assert word.isalpha() and len(word) >= 2
        assert tok.decode([idx]) == " " + word  # one token that is the word with its leading space


def test_lm_infill_ranks_valid_words_by_full_context_logprob(tiny_lm):
    model, tok = tiny_lm
    proposer = LMInfillProposer(model, tok, context="Instruction:", shortlist=8)
    left, right = ["what", "is"], ["capital", "of"]
    words = proposer.propose(left, right, current="the", n=3, exclude={"to"})
    vocab = set(whole_word_vocab(tok)[0])
    assert 1 <= len(words) <= 3 and len(set(words)) == len(words)
    assert set(words) <= vocab and "the" not in words and "to" not in words

    def full_score(word: str) -> float:  # log p(word, right | context, left) from one plain forward pass
        prefix = tok("Instruction: what is")["input_ids"]
        rest = [tok.convert_tokens_to_ids("Ġ" + word)] + tok(" capital of", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix + rest])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        return sum(float(logp[len(prefix) + i - 1, t]) for i, t in enumerate(rest))

    scores = [full_score(w) for w in words]
    assert scores == sorted(scores, reverse=True)
    assert proposer.scores(left, right, words) == pytest.approx(np.array(scores), abs=1e-4)  # prefix KV cache reused
    assert proposer.scores(left, right, words, reuse_cache=False) == pytest.approx(np.array(scores), abs=1e-4)


def test_embedding_neighbours_and_random_proposers(tiny_lm):
    model, tok = tiny_lm
    proposer = EmbeddingNeighbourProposer.from_model(model, tok)
    current = proposer.words[0]
    got = proposer.propose([], ["x"], current, n=2)
    table = model.get_input_embeddings().weight.detach().numpy()
    words, ids = whole_word_vocab(tok)
    unit = table[ids] / np.linalg.norm(table[ids], axis=1, keepdims=True)
    sims = unit @ unit[0]
    sims[0] = -np.inf  # the current word itself
    assert got[0] == words[int(np.argmax(sims))] and len(got) == 2
    assert proposer.propose(["a"], [], None, n=3)  # an insertion uses the neighbours' mean vector

    rand = RandomProposer(words)
    picks = rand.propose([], [], words[0], n=len(words), exclude={words[1]}, rng=np.random.default_rng(0))
    assert len(picks) == len(set(picks)) == len(words) - 2 and not {words[0], words[1]} & set(picks) and set(picks) <= set(words)


def test_build_proposer_from_config(tiny_model_dir):
    for name, kind in [("lm-infill", LMInfillProposer), ("embedding-neighbours", EmbeddingNeighbourProposer),
                       ("random", RandomProposer)]:
        proposer = build_proposer(ProposerConfig(name=name, model=str(tiny_model_dir), device="cpu"))
        assert isinstance(proposer, kind)
        assert proposer.propose(["what"], ["capital"], "is", n=2, rng=np.random.default_rng(0))


def test_mlm_proposer_on_a_tiny_random_bert(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    words = sorted({w for line in ["a great movie with a wonderful cast", "what is the capital of france",
                                   "the team won the game", "boring and too long"] for w in line.split()})
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "##s", *words])})
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    proposer = build_proposer(ProposerConfig(name="mlm", model=str(tmp_path), device="cpu", dtype="float32"))
    assert isinstance(proposer, MLMProposer)
    got = proposer.propose(["what", "is"], ["capital"], "the", n=4, exclude={"great"})
    assert len(got) == 4 and set(got) <= set(words) - {"the", "great"}
    # The first word is the model's argmax at the mask among the allowed whole words.
    enc = tokenizer("what is [MASK] capital", return_tensors="pt")
    with torch.no_grad():
        logits = proposer.model(**enc).logits[0, 3]
    allowed = [w for w in words if w not in {"the", "great"} and len(w) >= 2]
    assert got[0] == max(allowed, key=lambda w: float(logits[tokenizer.convert_tokens_to_ids(w)]))


def test_search_against_a_real_in_process_scorer(tiny_lm):
    from fedprompt.models.scoring import score_label_words

    model, tok = tiny_lm

    class LocalScorer(BlackBoxLM):
        def classify(self, texts, labels, labels_only=False):
            scores = score_label_words(model, tok, texts, labels, batch_size=16)
            usage = Usage(requests=1, queries=len(texts))
            self.usage.add(usage)
            return ClassifyResult([int(i) for i in scores.argmax(1)], None if labels_only else scores, usage)

    spec = TaskSpec(name="toy", labels=("negative", "positive"), label_words=(" negative", " positive"),
                    template="{prompt}\n\nReview: {text}", manual_prompt="Is the review positive or negative?",
                    answer_prefix="Sentiment:")
    local = [Example("a great movie with a wonderful cast", 1), Example("a terrible film , boring and too long", 0)] * 3
    proposer = LMInfillProposer(model, tok, shortlist=8)
    bb = LocalScorer()
    config = SearchConfig(budget=6 * 5, local_batch_size=6, public_batch_size=0, candidates_per_step=2, feedback="margin")
    result = PromptSearch(config, proposer).run(bb, spec, spec.manual_prompt, local, seed=0)
    assert result.queries == bb.usage.queries <= 30 and result.steps >= 2
    assert 0.0 <= result.accuracy <= 1.0 and result.accuracy >= result.start_accuracy
    assert set(result.prompt) <= set(spec.manual_prompt.split()) | set(proposer.words)
