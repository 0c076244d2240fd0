"""Secrets in the config (an API key): they reach the apps through the environment, never through a file.

A run writes its config to many files (config.yaml, run_config.toml, Hydra's .hydra/*, checkpoint.json,
deploy/service.yaml), all readable by whoever can read the run folder. So a secret's value is moved into the
environment variable its readers already fall back to (``service.api_key`` -> ``$FEDPROMPT_API_KEY``, read by
the http and openai clients) and the config keeps :data:`REDACTED` in its place. Every process the launcher
starts (SuperLink, ServerApp, ClientApps, Ray workers, the local service) inherits the environment, so the
apps still send the key; :meth:`ClientSettings.from_config` reads :data:`REDACTED` as "take it from there".
"""

from __future__ import annotations

import os
from typing import Sequence, cast

from omegaconf import DictConfig, OmegaConf

from fedprompt.errors import ConfigError

REDACTED = "***"
# secret config key -> the environment variable that the code reading the key falls back to
SECRETS: dict[str, str] = {"service.api_key": "FEDPROMPT_API_KEY"}


def _override_value(item: str) -> object:
    """The value of one ``key=value`` override as Hydra reads it (quotes removed), else the raw text."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(item)
    except HydraException:
        return item.partition("=")[2]
    if override.is_sweep_override():
        raise ConfigError(f"{override.key_or_group} takes one value, not a sweep; its value is not shown here")
    return override.value()


def redact_overrides(overrides: Sequence[str]) -> list[str]:
    """Command-line overrides with each secret exported to its environment variable and replaced by
    ``<key>=***``: Hydra then writes (and reports errors with) the redacted override only."""
    out: list[str] = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        env = SECRETS.get(key.lstrip("+~"))
        value = _override_value(item) if env and sep else None
        # no key, null, already redacted, or an interpolation (${oc.env:X}: no secret in the text; redact_config
        # exports its value at launch)
        if not env or value is None or value == REDACTED or "${" in str(value):
            out.append(item)
            continue
        os.environ[env] = str(value)  # inherited by every process started from here on
        out.append(f"{key}={REDACTED}")
    return out


def redact_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with each secret's value moved into its environment variable (for a config built some other way
    than the command line: a yaml file, `fedprompt resume` overrides); what the run then writes holds ``***``."""
    for key, env in SECRETS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value != REDACTED:
            os.environ[env] = str(value)
            node: object = REDACTED
            for part in reversed(key.split(".")):
                node = {part: node}
            cfg = cast(DictConfig, OmegaConf.merge(cfg, node))  # a merged copy of a DictConfig is one
    return cfg
