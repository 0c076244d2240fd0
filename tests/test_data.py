"""Data layer: task folders, hub split mapping, validation errors, k-shot sampling, partitioning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedprompt.data import Example, load_task, partition_examples, sample_balanced, sample_k_shot, task_from_config
from fedprompt.data.loading import CARVE, _hub_rows, carve, hub_splits, load_hub_split
from fedprompt.data.sampling import balanced_quotas
from fedprompt.errors import ConfigError, DataError

TOY = {"name": "toy", "template": "{prompt}\n\nText: {text}", "manual_prompt": "Label it."}


def test_any_folder_works_with_labels_from_meta(tiny_data):
    task = load_task(TOY, tiny_data)
    assert task.spec.labels == ("negative", "positive")
    assert task.spec.label_words == (" negative", " positive")  # default verbalizer: the label names
    rows = task.split("train")
    assert len(rows) == 12 and {r.label for r in rows} == {0, 1}


def test_the_task_config_renames_the_classes_of_a_folder_without_touching_meta(tiny_data):
    """A dataset whose meta.json names (or orders) its classes wrongly is fixed from the config alone."""
    task = load_task({**TOY, "labels": ["bad", "good"], "manual_prompt": "Is it {labels}?"}, tiny_data)
    assert task.spec.labels == ("bad", "good") and task.spec.label_words == (" bad", " good")
    assert task.spec.manual_prompt == "Is it bad, good?"
    assert json.loads((tiny_data / "toy" / "meta.json").read_text())["labels"] == ["negative", "positive"]
    words = load_task({**TOY, "labels": ["bad", "good"], "label_words": [" awful", " great"]}, tiny_data).spec
    assert words.label_words == (" awful", " great")
    with pytest.raises(DataError, match="task.labels names 3 classes .* has 2"):
        load_task({**TOY, "labels": ["a", "b", "c"]}, tiny_data)


def test_data_dir_from_environment(tiny_data, monkeypatch):
    monkeypatch.setenv("FEDPROMPT_DATA_DIR", str(tiny_data))
    assert load_task(TOY).folder == tiny_data / "toy"


def test_missing_data_folder_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data_dir"):
        load_task(TOY, tmp_path / "nowhere")
    with pytest.raises(DataError, match="task folder"):
        load_task({**TOY, "name": "absent"}, tmp_path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok", "label": 0', "malformed JSON"),
        ('{"text": 3, "label": 0}', "'text' must be a string"),
        ('{"text": "ok", "label": "1"}', "'label' must be an integer"),
        ('{"text": "ok", "label": 7}', "out of range"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_row_reports_file_and_line(tiny_data, line, message):
    path = tiny_data / "toy" / "test.jsonl"
    path.write_text('{"text": "fine", "label": 1}\n' + line + "\n")
    task = load_task(TOY, tiny_data)
    with pytest.raises(DataError, match=rf"test\.jsonl:2: .*{message}"):
        task.split("test")


@pytest.mark.parametrize("name, message", [
    ("test.jsonl", r"test\.jsonl:2: not UTF-8 \(byte 0xff\); split files must be UTF-8 JSON Lines"),
    ("meta.json", r"meta\.json:2: not UTF-8 \(byte 0xff\); meta.json must be UTF-8 JSON"),
])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tiny_data, name, message):
    path = tiny_data / "toy" / name
    path.write_bytes(path.read_bytes().split(b"\n")[0] + b"\n\xff\xfe binary \x00\n")
    with pytest.raises(DataError, match=message):
        load_task(TOY, tiny_data).split("test")


def test_a_task_name_is_one_folder_name(tiny_data):
    for name in ("../toy", "toy/../toy", "/etc", ".."):
        with pytest.raises(ConfigError, match="not a plain folder name.*task.path="):
            load_task({**TOY, "name": name}, tiny_data / "sub")
    assert load_task({**TOY, "name": "elsewhere", "path": str(tiny_data / "toy")}).folder == tiny_data / "toy"


def test_pair_task_needs_text_pair(tiny_data):
    cfg = {"name": "toypair", "template": "{prompt} {text} || {text_pair}", "is_pair": True}
    task = load_task(cfg, tiny_data)
    ex = task.split("train")[0]
    assert task.spec.format(ex, "P") == "P premise 0 || hypothesis 0\nAnswer:"
    (tiny_data / "toypair" / "test.jsonl").write_text('{"text": "p", "label": 0}\n')
    with pytest.raises(DataError, match="pair task"):
        task.split("test")


def test_template_and_label_word_validation():
    base = {"name": "t", "template": "{prompt} {text}", "manual_prompt": "x"}
    with pytest.raises(ConfigError, match="unknown fields"):
        task_from_config({**base, "template": "{text} {oops}"}, ["a", "b"])
    with pytest.raises(ConfigError, match="empty"):
        task_from_config({**base, "label_words": [" a", " "]}, ["a", "b"])
    with pytest.raises(ConfigError, match="one label word per label"):
        task_from_config({**base, "label_words": [" a"]}, ["a", "b"])
    with pytest.raises(ConfigError, match="chat_format"):
        task_from_config(base, ["a", "b"]).with_chat_format("{user} only")
    spec = task_from_config(base, ["a", "b"]).with_chat_format("<u>{user}</u>{answer}")
    assert spec.format(Example("hi", 0), "P") == "<u>P hi</u>Answer:"


def test_meta_labels_must_be_a_list(tiny_data):
    (tiny_data / "toy" / "meta.json").write_text(json.dumps({"labels": "neg,pos"}))
    with pytest.raises(DataError, match="'labels' must be a list"):
        load_task(TOY, tiny_data)


def _examples(n_per_class=(30, 20, 10)):
    return [Example(f"{c}-{i}", c) for c, n in enumerate(n_per_class) for i in range(n)]


def test_k_shot_is_seeded_and_balanced():
    rows = _examples()
    a, b = sample_k_shot(rows, 4, 3, seed=1), sample_k_shot(rows, 4, 3, seed=1)
    assert a == b and len(a) == 12
    assert sorted(e.label for e in a) == [0] * 4 + [1] * 4 + [2] * 4
    assert sample_k_shot(rows, 4, 3, seed=2) != a
    with pytest.raises(DataError, match=r"larger than .* classes \{2: 10\}"):
        sample_k_shot(rows, 11, 3)


def test_balanced_sample_keeps_a_rare_class_whole_and_fills_the_rest():
    rows = _examples((30, 20, 2))
    sample = sample_balanced(rows, 30, 3, seed=1)
    # 10 per class asked; class 2 has only 2, so its 8 go to the others (not every class cut to 2).
    assert sorted(e.label for e in sample) == [0] * 14 + [1] * 14 + [2] * 2
    assert sample == sample_balanced(rows, 30, 3, seed=1) and sample != sample_balanced(rows, 30, 3, seed=2)
    assert balanced_quotas([30, 20, 10], 30) == [10, 10, 10]
    assert balanced_quotas([30, 5, 0, 2], 30) == [23, 5, 0, 2]
    assert sum(balanced_quotas([3, 3, 3], 30)) == 9


@pytest.mark.parametrize("scheme, kwargs", [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("pathological", {"classes_per_client": 1})])
def test_partition_covers_every_example_once(scheme, kwargs):
    rows = _examples()
    part = partition_examples(rows, 4, 3, scheme, seed=0, **kwargs)
    flat = [e for client in part.clients for e in client]
    assert sorted(e.text for e in flat) == sorted(e.text for e in rows)
    assert [sum(h) for h in part.histograms] == [len(c) for c in part.clients]
    again = partition_examples(rows, 4, 3, scheme, seed=0, **kwargs)
    assert again.clients == part.clients
    if scheme == "pathological":
        assert all(sum(1 for n in h if n) <= 1 for h in part.histograms)


def test_dirichlet_alpha_controls_skew():
    rows = _examples((200, 200, 200))
    skew = lambda p: sum(max(h) / max(1, sum(h)) for h in p.histograms) / len(p.histograms)  # noqa: E731
    assert skew(partition_examples(rows, 5, 3, "dirichlet", alpha=0.05, seed=0)) > skew(
        partition_examples(rows, 5, 3, "dirichlet", alpha=100, seed=0)
    )


def test_partition_bad_input():
    rows = _examples((3, 3, 3))
    for alpha in (0, float("inf"), float("nan")):  # inf and nan: flwr-datasets would draw until "max attempts"
        with pytest.raises(ConfigError, match="alpha must be > 0 and finite"):
            partition_examples(rows, 2, 3, "dirichlet", alpha=alpha)
    with pytest.raises(ConfigError, match="10 clients but only 9"):
        partition_examples(rows, 10, 3, "iid")
    with pytest.raises(ConfigError, match="unknown partition scheme"):
        partition_examples(rows, 2, 3, "random")


# --- the hub: each split reads its own hub split, or validation is carved from hub train ---------------------

CONF_TASKS = sorted((Path(__file__).resolve().parents[1] / "conf" / "task").glob("*.yaml"))
HUB_TOY = {**TOY, "name": "toyhub", "hf": {"path": "org/toy", "text": "sentence", "label": "label"}}


@pytest.fixture
def fake_hub(monkeypatch):
    """``datasets.load_dataset`` answering from memory: a 40-row train and a 10-row test, no validation."""
    import datasets

    def split(prefix: str, n: int) -> datasets.Dataset:
        features = datasets.Features({"sentence": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["negative", "positive"])})
        return datasets.Dataset.from_dict({"sentence": [f"{prefix} {i}" for i in range(n)],
                                           "label": [i % 2 for i in range(n)]}, features=features)

    hub = {"train": split("train", 40), "test": split("test", 10)}
    calls: list[str] = []

    def load_dataset(path, name=None, split=None):
        calls.append(split)
        if split not in hub:
            raise ValueError(f"Unknown split {split!r}")
        return hub[split]

    monkeypatch.delenv("FEDPROMPT_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    _hub_rows.cache_clear()
    yield calls
    _hub_rows.cache_clear()


def _texts(rows) -> list[str]:
    return [r.text for r in rows]


def test_hub_carves_validation_from_train_and_keeps_test_apart(fake_hub):
    cfg = {**HUB_TOY, "hf": {**HUB_TOY["hf"], "splits": {"validation": CARVE}}}
    task = load_task(cfg)
    assert task.spec.labels == ("negative", "positive")  # from the hub's ClassLabel
    train, val, test = (set(_texts(task.split(s))) for s in ("train", "validation", "test"))
    assert len(val) == 4 and not val & test and not train & test  # 10% of 40, no test row in a choice
    assert not train & val and train | val == {f"train {i}" for i in range(40)}  # disjoint, together hub train
    assert fake_hub.count("train") == 1  # train, validation and the label names: one load of hub train
    _hub_rows.cache_clear()  # a fresh process carves the same rows
    assert set(_texts(load_hub_split(cfg, "validation")[0])) == val
    sized = {**cfg, "hf": {**cfg["hf"], "validation_size": 7}}
    assert [len(load_hub_split(sized, s)[0]) for s in ("train", "validation")] == [33, 7]


def test_carve_size_follows_shared_data():
    rows = [Example(f"r{i}", 0) for i in range(5452)]  # TREC's train: shared/data carved 545
    rest, held = carve(rows)
    assert len(held) == 545 and len(rest) == 4907 and carve(rows) == (rest, held)
    assert len(carve([Example(f"r{i}", 0) for i in range(120000)])[1]) == 1000  # capped: AG News
    with pytest.raises(DataError, match="cannot carve 40"):
        carve(rows[:40], 40)


@pytest.mark.parametrize(
    "splits, message",
    [
        ({"validation": "test"}, "maps both 'validation' and 'test' to hub split 'test'.*validation: carve"),
        ({"test": "validation"}, "maps both 'validation' and 'test' to hub split 'validation'"),
        ({"test": "train"}, "maps both 'train' and 'test'"),
        ({"test": CARVE}, "only validation can be 'carve'"),
        ({"dev": "validation"}, r"unknown split\(s\) \['dev'\]"),
    ],
)
def test_aliased_hub_mapping_is_refused_before_loading(fake_hub, splits, message):
    cfg = {**HUB_TOY, "hf": {**HUB_TOY["hf"], "splits": splits}}
    with pytest.raises(DataError, match=message):
        load_hub_split(cfg, "train")
    assert not fake_hub  # refused up front: nothing was downloaded


@pytest.mark.parametrize("path", CONF_TASKS, ids=lambda p: p.stem)
def test_shipped_hub_mappings_are_distinct(path):
    hub = OmegaConf.to_container(OmegaConf.load(path)).get("hf")
    if hub is None:
        return  # custom: no hub dataset
    plan = hub_splits(hub)
    assert plan["validation"] != plan["test"] and plan["validation"] in ("validation", CARVE)
