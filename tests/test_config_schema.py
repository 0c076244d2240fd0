"""The composed config is checked before anything starts: unknown keys anywhere (command line, a yaml file
in conf/, the run config the apps receive, a run folder's config.yaml), values of the wrong type, the
privacy group, a model or task that does not exist; and the model=/task= shorthands in sweeps."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedprompt import cli
from fedprompt.config import compose, rewrite_shorthands
from fedprompt.errors import ConfigError
from fedprompt.runs.run_config import RUN_CONFIG_KEY, config_from_run_config, serialize_config, validate_config
from tests.fl_support import tiny_overrides, write_secret_task

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+federation.roundz=3"], "unknown config key 'federation.roundz': the federation node takes ["),
        (["+limitt=3"], "unknown config key 'limitt': the root config takes ["),
        (["+service.client.retrys=1"], "unknown config key 'service.client.retrys'"),
        (["+task.hf.txt=x"], "unknown config key 'task.hf.txt'"),
        (["+federation.roundz=3"], "did you mean 'federation.rounds'?"),
        (["federation.rounds=abc"], "federation.rounds must be a whole number (e.g. 3; not a string, 3.0 or true), got 'abc'"),
        (["federation.rounds=3.0"], "federation.rounds must be a whole number"),
        (["federation.rounds=0"], "federation.rounds must be >= 1"),
        (["partition.alpha=many"], "partition.alpha must be a number, got 'many'"),
        (["service.limits.max_batch=0"], "service.limits.max_batch must be a positive number, got 0"),
        (["+service.budget.requests=-1"], "service.budget.requests must be a non-negative integer or null"),
        (["deploy.superlink_port=70000"], "deploy.superlink_port must be a port in 0..65535"),
        (["federation.roundz=3"], "Could not override 'federation.roundz'"),  # Hydra's own check, without +
    ],
)
def test_unknown_keys_and_wrong_types_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("method", sorted(f.stem for f in (CONF / "method").glob("*.yaml")))
def test_every_method_yaml_composes_and_validates_as_shipped(method):
    from fedprompt.runs.run_config import method_config

    typed = method_config(compose([f"method={method}"]))
    if method == "fedprompt":  # ${model.name} resolves against the whole config, not inside the method section
        assert typed.model == "smollm2-135m"


@pytest.mark.parametrize("method, key", [("feddtpt", "search.budget"), ("bdpl", "local_steps"), ("rapt", "train.steps"),
                                         ("bbt", "popsize"), ("post", "train.local_steps")])
def test_one_coercion_rule_for_every_method(method, key):
    """Same input, same verdict whichever method reads it: an integer key refuses text and 3.0 alike."""
    from fedprompt.runs.run_config import validate_config

    for value in ("'240'", "240.0", "true"):
        with pytest.raises(ConfigError, match=f"method.{key} must be a whole number") as err:
            validate_config(compose(["partition=iid", f"method={method}", f"method.{key}={value}"]))
        assert "\n" not in str(err.value)


def declared_files():
    """(conf/ file, ConfigStore group, name, the dataclass) of every declared section (fedprompt.config)."""
    from fedprompt.config import declared_sections

    out = []
    for group, name, path, _ in declared_sections():
        file = CONF / "method" / f"{name}.yaml" if group == "method/declared" else CONF / group / "default.yaml"
        out.append(pytest.param(file, group, name, path, id=str(file.relative_to(CONF))))
    return out


@pytest.mark.parametrize("file, group, name, path", declared_files())
def test_conf_sets_only_what_differs_from_the_declared_defaults(file, group, name, path):
    """Defaults once: every section's defaults are its dataclass's (Hydra's ConfigStore, <group>/declared or
    method/declared/<method>); its conf/ file lists that first and sets only values that differ (interpolations
    such as ${port}), so a default changed in the dataclass is the default of every command."""
    from omegaconf import OmegaConf

    from fedprompt.config import declared_node

    declared = declared_node(path)
    node = OmegaConf.to_container(OmegaConf.load(file))
    entry = f"declared/{name}" if group == "method/declared" else "declared"
    assert node.get("defaults", [None])[0] == entry, f"{file.name}: its defaults list must start with {entry}"
    node = node.get("service", {}) if group == "service" else node  # service/default.yaml is at the root package

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for key, value in leaves(node):
        if key == "defaults":
            continue
        default = declared
        for part in key.split("."):
            default = default[part]
        assert value != default, f"{file.relative_to(CONF)} repeats the declared default {key}={value!r}"


@pytest.mark.parametrize("override", ["federation.rounds=5", "service.limits.max_batch=5", "deploy.startup_timeout_s=5",
                                      "method.search.budget=5", "distill.steps=5", "transfer.steps=5",
                                      "method=post method.train.local_steps=5", "method=rapt method.train.steps=5",
                                      "method=bbt method.popsize=5", "method=bdpl method.local_steps=5",
                                      "method=fedprompt method.prompt.num_tokens=5"])
def test_a_plain_override_sets_a_key_that_no_yaml_file_names(override):
    from omegaconf import OmegaConf

    *choice, item = override.split()
    key = item.partition("=")[0]
    assert OmegaConf.select(compose([*choice, item]), key) == 5


def test_the_shipped_method_configs_are_the_declared_ones():
    """What each method runs with by default is its dataclass's default (FedPrompt: on the served model)."""
    from dataclasses import asdict

    from fedprompt.runs.run_config import method_config

    for method in sorted(f.stem for f in (CONF / "method").glob("*.yaml")):
        typed = method_config(compose([f"method={method}"]))
        declared, shipped = asdict(type(typed)()), asdict(typed)
        apart = {k for k in set(declared) | set(shipped) if declared.get(k) != shipped.get(k)}
        assert apart == ({"model"} if method == "fedprompt" else set()), (method, sorted(apart))
    from fedprompt.models.distill_config import DistillConfig
    from fedprompt.typed_config import from_node

    assert from_node(DistillConfig, compose([]).distill, "distill") == DistillConfig()


def test_composing_imports_no_torch():
    """The declaring modules of every section are torch-free: composing a config stays fast."""
    import subprocess
    import sys

    code = ("import sys; from fedprompt.config import compose; compose(['method=post']); compose(['method=feddtpt']); "
            "print(sorted(m for m in ('torch', 'transformers', 'opacus', 'flwr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


def test_run_help_of_a_trimmed_method_lists_its_keys_with_their_help(capsys):
    assert cli.main(["run", "method=post", "--help"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("method.train.local_steps:"))
    assert "int = 8" in line and "optimizer steps per client per round" in line
    assert "method.privacy.noise_seed: str = simulation" in out and "method.model: str = student" in out


def test_an_unknown_key_in_a_yaml_file_of_conf_is_an_error(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "partition" / "typo.yaml").write_text("scheme: dirichlet\nalhpa: 0.1\nmin_size: 1\nk_shot: 8\n")
    monkeypatch.setenv("FEDPROMPT_CONF_DIR", str(conf))
    with pytest.raises(ConfigError, match="unknown config key 'partition.alhpa'"):
        compose(["partition=typo"])
    assert cli.main(["run", "partition=typo"]) == 2  # the Hydra app reads the same conf/
    err = capsys.readouterr().err
    assert "partition.alhpa" in err and len(err.strip().splitlines()) == 1


def test_privacy_group_default_and_checks():
    cfg = compose([])
    assert cfg.privacy.name == "none"
    validate_config(compose(["partition=iid"]))
    with pytest.raises(ConfigError, match="privacy.name='dp-sgd' is not one of"):
        validate_config(compose(["partition=iid", "privacy.name=dp-sgd"]))
    with pytest.raises(ConfigError, match="unknown config key 'privacy.epsilon': the privacy node takes \\['name'\\]"):
        validate_config(compose(["partition=iid", "+privacy.epsilon=8"]))


def test_the_apps_and_resume_recheck_the_keys(tmp_path, tiny_model_dir, capsys):
    cfg = compose(tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir))
    data = json.loads(serialize_config(cfg))
    data["federation"]["rounds_"] = 2
    with pytest.raises(ConfigError, match="unknown config key 'federation.rounds_'"):
        config_from_run_config({RUN_CONFIG_KEY: json.dumps(data)})

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(json.dumps(data))  # JSON is YAML: a run folder's config, with a typo
    assert cli.main(["resume", str(folder)]) == 2
    assert "unknown config key 'federation.rounds_'" in capsys.readouterr().err
    assert cli.main(["resume", str(tmp_path / "nothing-here")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_a_model_or_task_that_does_not_exist(tmp_path, tiny_model_dir, capsys):
    base = tiny_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir)
    assert cli.main(["run", *base, "model=/no/such/model-folder"]) == 2
    assert "unknown model '/no/such/model-folder'" in capsys.readouterr().err
    assert cli.main(["run", *base, "task=nosuchtask"]) == 2
    assert "unknown task 'nosuchtask'" in capsys.readouterr().err


def test_model_and_task_shorthands_also_in_sweeps():
    assert rewrite_shorthands(["model=org/a"]) == ["model=hf", "model.name=org/a"]
    assert rewrite_shorthands(["model=org/a,org/b"]) == ["model=hf", "model.name=org/a,org/b"]
    assert rewrite_shorthands(["model=smollm2-135m,gemma3-270m"]) == ["model=smollm2-135m,gemma3-270m"]
    assert rewrite_shorthands(["task=mine,yours", "seed=0,1"]) == ["task=custom", "task.name=mine,yours", "seed=0,1"]
    with pytest.raises(ConfigError, match="a sweep cannot mix task files \\(sst2\\) with other names"):
        rewrite_shorthands(["task=sst2,mine"])


@dataclass(frozen=True)
class Inner:
    depth: int = 1

    def validate(self):
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")


@dataclass(frozen=True)
class Section:
    budget: int = 1
    rate: float = 0.5
    flag: bool = False
    text: str = "x"
    inner: Inner = field(default_factory=Inner)

    def validate(self):
        if self.budget < 1:
            raise ConfigError(f"budget must be >= 1, got {self.budget}")


@pytest.mark.parametrize("node, verdict", [
    ({"budget": 240}, None), ({"budget": "240"}, "a.b.budget must be a whole number"),
    ({"budget": 240.0}, "a.b.budget must be a whole number"), ({"budget": True}, "a.b.budget must be a whole number"),
    ({"rate": 1}, None), ({"rate": "0.5"}, "a.b.rate must be a number, got '0.5'"), ({"rate": float("inf")}, None),
    ({"flag": "yes"}, "a.b.flag must be true or false"), ({"flag": 1}, "a.b.flag must be true or false"),
    ({"text": 5}, "a.b.text must be text, got 5"), ({"budget": None}, "a.b.budget must not be null"),
    ({"budget": 0}, "^a.b.budget must be >= 1, got 0$"), ({"budgte": 1}, "did you mean 'a.b.budget'"),
    ({"inner": {"depth": 0}}, "^a.b.inner.depth must be >= 1, got 0$"), ({"inner": 3}, "a.b.inner must be a mapping"),
])
def test_the_one_validator_and_its_rule(node, verdict):
    """typed_config.from_node: one rule for every section (JSON's types, strictly) and one-line errors naming
    the full key, whether pydantic or the section's validate() found the problem."""
    from fedprompt.typed_config import from_node

    if verdict is None:
        assert isinstance(from_node(Section, node, "a.b"), Section)
        return
    with pytest.raises(ConfigError, match=verdict) as err:
        from_node(Section, node, "a.b")
    assert "\n" not in str(err.value)
