"""FedDTPTConfig: validation, seed prompts, the parts built from it."""

from __future__ import annotations

import numpy as np
import pytest

from fedprompt.data.task import TaskSpec
from fedprompt.errors import ConfigError
from fedprompt.methods.feddtpt import FedDTPTAggregator, FedDTPTConfig, PromptSearch, RandomProposer

TREC = TaskSpec(name="trec", labels=("abbreviation", "description", "number"),
                label_words=(" abbreviation", " description", " number"), template="{prompt}\n\nQuestion: {text}",
                manual_prompt="What type of thing does this question ask for?")


@pytest.mark.parametrize(
    "override, match",
    [
        ({"serach": {}}, "unknown config key 'method.serach'.*did you mean 'method.search'"),
        ({"search": {"budgte": 5}}, "unknown config key 'method.search.budgte'"),
        ({"name": "post"}, "for 'feddtpt'"),
        ({"search": {"budget": 0}}, "^method.search.budget must be >= 1, got 0$"),
        ({"search": {"budget": "many"}}, "method.search.budget must be a whole number"),
        ({"search": {"budget": "240"}}, "method.search.budget must be a whole number"),
        ({"search": {"budget": 240.0}}, "method.search.budget must be a whole number"),
        ({"search": {"budget": 30}}, "cannot score the start prompt"),
        ({"search": {"feedback": "loss"}}, "search.feedback='loss'"),
        ({"search": {"edit_ops": {"swap": 1.0}}}, "unknown operations \\['swap'\\]"),
        ({"search": {"edit_ops": {"insert": 1.0}}}, "replace > 0"),
        ({"search": {"resample_batch": "yes"}}, "resample_batch"),
        ({"search": {"min_tokens": 5, "max_tokens": 4}}, "max_tokens"),
        ({"proposer": {"name": "bert"}}, "proposer.name='bert'"),
        ({"proposer": {"model": None}}, "proposer.model is required"),
        ({"aggregate": {"mode": "mean"}}, "aggregate.mode='mean'"),
        ({"aggregate": {"eps": 3.0}}, "cosine distance"),
        ({"aggregate": {"min_samples": 0}}, "min_samples must be a count >= 1 or a fraction"),
        ({"aggregate": {"min_samples": 2.5}}, "min_samples must be a count >= 1 or a fraction"),
        ({"seed_prompt": {"style": "verbose"}}, "seed_prompt.style='verbose'"),
        ({"seed_prompt": {"templates": {"concise": "{nope}", "moderate": "x", "detailed": "y"}}}, "bad placeholder"),
        ({"seed_prompt": {"templates": {"concise": "x"}}}, "non-empty template"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        FedDTPTConfig.from_dict(override)


def test_overrides_are_kept():
    cfg = FedDTPTConfig.from_dict({"search": {"budget": 240, "feedback": "margin"}, "aggregate": {"eps": 0.2, "top_n": 5}})
    assert cfg.search.budget == 240 and cfg.search.feedback == "margin"
    assert cfg.aggregate.eps == 0.2 and cfg.aggregate.top_n == 5 and cfg.aggregate.mode == "dbscan"


def test_seed_prompts_in_three_styles():
    cfg = FedDTPTConfig()
    assert cfg.initial_prompt(TREC) == TREC.manual_prompt.split()  # moderate: the manual prompt
    concise = FedDTPTConfig.from_dict({"seed_prompt": {"style": "concise"}}).initial_prompt(TREC)
    assert " ".join(concise) == "Classify the text as abbreviation, description or number."
    detailed = FedDTPTConfig.from_dict({"seed_prompt": {"style": "detailed"}}).initial_prompt(TREC)
    assert len(detailed) > len(cfg.initial_prompt(TREC)) > len(concise)
    mixed = FedDTPTConfig.from_dict({"seed_prompt": {"style": "mixed"}})
    assert [mixed.initial_prompt(TREC, i) for i in range(4)] == [concise, cfg.initial_prompt(TREC), detailed, concise]


def test_parts_built_from_the_config_take_injected_parts():
    cfg = FedDTPTConfig.from_dict({"aggregate": {"mode": "no-clustering", "top_n": 1}})
    search = PromptSearch(cfg.search, RandomProposer(["alpha", "beta"]))
    assert isinstance(search, PromptSearch) and search.config == cfg.search

    class Embed:
        def encode(self, words):
            return np.stack([np.eye(3)[len(w) % 3] for w in words])

    aggregator = FedDTPTAggregator(cfg.aggregate, Embed())
    assert isinstance(aggregator, FedDTPTAggregator)
    assert aggregator.aggregate([["ab", "cde"], ["ab", "f"]]).prompt == ["ab"]


def test_server_check_without_a_public_pool_is_refused_before_launch():
    from omegaconf import OmegaConf

    from fedprompt.fl.feddtpt import check

    cfg = OmegaConf.create({"federation": {"public_size": 0}, "method": {"name": "feddtpt", "aggregate": {"server_check": True}}})
    with pytest.raises(ConfigError, match="public_size is 0"):
        check(cfg, None)
