"""``fedprompt run`` as a Hydra application: one run, or a sweep (``-m``) of runs, each in Hydra's folder.

    fedprompt run task=sst2 federation.rounds=3                   # outputs/run/<time>-sst2-feddtpt/
    fedprompt run -m partition.alpha=0.05,0.1,1,100 seed=0,1,2    # multirun/<time>/<job number>/

Hydra composes ``conf/``, expands the sweep (its sweeper plugin, the basic one unless ``hydra/sweeper=``
says otherwise), creates the run / job folders (with ``.hydra/``, and ``multirun.yaml`` for a sweep) and
runs each job in turn (its launcher plugin); each job is one :func:`fedprompt.commands.run.cmd_run` (its own
SuperLink + ``flwr run``) whose run folder is the job's Hydra output folder. Before Hydra starts, every
job's config is composed and checked as ``fedprompt run`` would (keys, values, data, partition, models),
so a typo in a sweep fails at once, with no folder written; the job then reuses that check's result
(:func:`fedprompt.commands.run.prepare` runs once a job). A job that fails later is reported (its line on
stderr, ``error.json`` in its folder) and the sweep goes on; the last stdout line is one JSON object: the
run's result, or the sweep's summary (also ``<sweep dir>/sweep.json``).

Only Hydra's public API is used (none of its private modules, and the process arguments stay as they are): the command line is parsed here
(:func:`parser`), the config is composed by the config loader of a Compose-API context
(``hydra.initialize_config_dir``, ``GlobalHydra.instance().config_loader()``), and the jobs are run as
Hydra's own ``hydra.main`` runs them, through the plugin interfaces: ``hydra.core.utils.run_job`` for one
run, ``Plugins.instance().instantiate_sweeper(...).sweep(...)`` for a sweep, with ``hydra.callbacks``
called around them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence, cast

from omegaconf import DictConfig, OmegaConf

from fedprompt.errors import ConfigError, FedPromptError, Interrupted


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other bad input (argparse would exit)
        raise ConfigError(f"{message}; see `fedprompt run --help`")


def parser() -> argparse.ArgumentParser:
    """``fedprompt run``'s command line: Hydra's flags that it answers, and the overrides."""
    p = _Parser(prog="fedprompt run", add_help=False)
    p.add_argument("overrides", nargs="*", help="key=value overrides (Hydra syntax; a,b sweeps with -m)")
    p.add_argument("--multirun", "-m", action="store_true", help="a sweep: one job per combination of values")
    p.add_argument("--run", "-r", action="store_true", help="one run (the default)")
    p.add_argument("--cfg", "-c", choices=["job", "hydra", "all"], help="print the composed config, run nothing")
    p.add_argument("--package", "-p", help="with --cfg: only this node of the config")
    p.add_argument("--resolve", action="store_true", help="with --cfg: resolve interpolations")
    p.add_argument("--config-name", "-cn", help="the root config of conf/ (default: config)")
    return p


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    args = parser().parse_intermixed_args(list(argv))
    if sum([bool(args.cfg), args.multirun, args.run]) > 1:
        raise ConfigError("only one of --run, --multirun and --cfg at a time")
    if (args.resolve or args.package) and not args.cfg:
        raise ConfigError("--resolve and --package go with --cfg")
    return args


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _is_hydra(override: str) -> bool:
    key = _key(override)
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def task_overrides(job: Sequence[str]) -> tuple[str, ...]:
    """A job's own overrides (not Hydra's): what Hydra records as ``hydra.overrides.task`` for it."""
    return tuple(o for o in job if not _is_hydra(o))


def expand_jobs(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """Each job's overrides, in the order Hydra's basic sweeper launches them: the product of the swept
    values, key by key in the order given (Hydra's public override parser reads the sweeps)."""
    if not multirun:
        return [list(overrides)]
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from fedprompt.config import conf_dir

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), job_name="run", version_base=None):
            loader = GlobalHydra.instance().config_loader()  # glob(...) lists a config group's options
            parsed = OverridesParser.create(config_loader=loader).parse_overrides(list(overrides))
        choices: dict[str, list[str]] = {}  # the basic sweeper's order: a repeated key keeps its first place
        for override in parsed:
            key = override.get_key_element()
            if not override.is_sweep_override():
                choices[key] = [f"{key}={override.get_value_element_as_str()}"]
            elif override.is_discrete_sweep():
                choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                assert override.value_type is not None  # a sweep override has a value type (is_sweep_override)
                raise HydraException(f"the basic sweeper does not support sweep type {override.value_type.name}")
    except HydraException as err:
        raise ConfigError(f"bad sweep {list(overrides)}: {err}") from None
    return [list(job) for job in itertools.product(*choices.values())]


def check_jobs(jobs: list[list[str]], config_name: str, multirun: bool = False) -> dict[tuple[str, ...], dict]:
    """Compose and check every job before the first one starts: first the config alone, then its data, then
    that Hydra can write its folder. Returns each job's :func:`~fedprompt.commands.run.prepare` result, by its
    :func:`task_overrides`: the job reuses it rather than preparing again."""
    from fedprompt.commands.run import prepare, resume_point
    from fedprompt.config import compose, merge
    from fedprompt.runs.run_config import validate_config

    shared = set.intersection(*(set(job) for job in jobs))

    def name(number: int) -> str:  # a sweep's job is named by its swept values
        return f"job {number} ({' '.join(o for o in jobs[number] if o not in shared)}): " if len(jobs) > 1 else ""

    configs = []
    for number, job in enumerate(jobs):
        try:
            cfg = compose([o for o in job if not _key(o).startswith("hydra")], config_name)
            validate_config(cfg)
            configs.append(cfg)
        except FedPromptError as err:
            raise type(err)(f"{name(number)}{err}") from None
    prepared: dict[tuple[str, ...], dict] = {}
    for number, cfg in enumerate(configs):
        try:
            prepared[task_overrides(jobs[number])] = prepare(cfg)  # its warnings show here, once
            if cfg.get("output_dir"):  # a named folder: refuse to overwrite an unfinished run before Hydra writes there
                folder = Path(str(cfg.output_dir))
                if folder.is_dir():
                    resume_point(merge(cfg, {"output_dir": str(folder.resolve())}), folder.resolve())
        except FedPromptError as err:
            raise type(err)(f"{name(number)}{err}") from None
    check_hydra_folder(jobs[0], config_name, multirun)
    return prepared


def check_hydra_folder(job: list[str], config_name: str, multirun: bool) -> None:
    """The run's (or sweep's) folder can be written: else Hydra fails, once the checks are done, with a long
    error of its own."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedprompt.config import check_writable_dir, conf_dir

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"  # all jobs of a sweep share its folder
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            folder = OmegaConf.select(compose(config_name, overrides=job, return_hydra_config=True), key)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad hydra override in {job}: {' '.join(str(err).split())}") from None
    given = {_key(o) for o in job}
    check_writable_dir(str(folder), "output_dir" if "output_dir" in given and not multirun else key)


def main(argv: Sequence[str]) -> int:
    """``fedprompt run [--multirun | --cfg job|hydra|all] [key=value ...]``; returns the exit code."""
    from fedprompt.config import register_declared_defaults, rewrite_shorthands, search_path_overrides
    from fedprompt.redact import redact_overrides

    register_declared_defaults()  # the sections whose defaults are their declarations' (conf/ lists `declared`)
    try:
        args = _parse(argv)
        config_name = args.config_name or "config"
        overrides = redact_overrides(rewrite_shorthands(args.overrides))  # Hydra writes no key into .hydra/
        overrides += search_path_overrides()  # the user's config folder (task init's task files)
        if args.cfg:
            return show_config(config_name, overrides, args.cfg, args.package, args.resolve)
        overrides = _launch_overrides(overrides, args.multirun)
        prepared = check_jobs(expand_jobs(overrides, args.multirun), config_name, args.multirun)
    except FedPromptError as err:
        print(f"fedprompt run: error: {err}", file=sys.stderr)
        return 2

    records: list[dict] = []
    sweep_dir: list[str] = []
    start = time.perf_counter()

    def job(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        sweep_dir[:] = [str(hydra_cfg.sweep.dir)]
        # the check's result for this job; none for a job the checks did not foresee (another sweeper's)
        partition = prepared.get(tuple(hydra_cfg.overrides.task)) if args.multirun else next(iter(prepared.values()))
        records.append(_run_job(cfg, args.multirun, partition))

    try:
        launch(config_name, overrides, job, args.multirun)
    except Interrupted as stop:  # a sweep stops too: its later jobs would be stopped the same way
        print(f"fedprompt run: {stop}", file=sys.stderr)
        return stop.exit_code
    except FedPromptError as err:  # Hydra refused the config after all (the checks compose it the same way)
        print(f"fedprompt run: error: {err}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug in one run (a sweep's jobs record theirs): as Hydra reports it
        traceback.print_exc()
        return 1
    if not args.multirun:
        record = records[0]
        if "error" in record:
            print(f"fedprompt run: error: {record['error']}", file=sys.stderr)
            return 2
        print(json.dumps(record))
        return 0
    failed = [r for r in records if "error" in r]
    summary = {"sweep_dir": str(Path(sweep_dir[0]).resolve()), "jobs": len(records),
               "completed": len(records) - len(failed), "failed": len(failed),
               "failures": [{"output_dir": r["output_dir"], "error": r["error"]} for r in failed],
               "wall_s": round(time.perf_counter() - start, 3)}
    (Path(sweep_dir[0]) / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 1 if failed else 0


class HydraCallbacks:
    """The ``hydra.callbacks`` of the config (public ``hydra.experimental.callback.Callback`` objects),
    called as Hydra's own runs call them: the end events in reverse order, a failing callback a warning."""

    def __init__(self, cfg: DictConfig) -> None:
        from hydra.utils import instantiate

        self.callbacks = [instantiate(c) for c in (OmegaConf.select(cfg, "hydra.callbacks") or {}).values()]

    def _notify(self, event: str, reverse: bool = False, **kwargs: Any) -> None:
        import warnings

        for callback in reversed(self.callbacks) if reverse else self.callbacks:
            try:
                getattr(callback, event)(**kwargs)
            except Exception as err:  # noqa: BLE001 - as Hydra: a callback's failure does not stop the run
                warnings.warn(f"Callback {type(callback).__name__}.{event} raised {type(err).__name__}: {err}",
                              stacklevel=2)

    def on_run_start(self, **kwargs: Any) -> None:
        self._notify("on_run_start", **kwargs)

    def on_run_end(self, **kwargs: Any) -> None:
        self._notify("on_run_end", reverse=True, **kwargs)

    def on_multirun_start(self, **kwargs: Any) -> None:
        self._notify("on_multirun_start", **kwargs)

    def on_multirun_end(self, **kwargs: Any) -> None:
        self._notify("on_multirun_end", reverse=True, **kwargs)

    def on_job_start(self, **kwargs: Any) -> None:
        self._notify("on_job_start", **kwargs)

    def on_job_end(self, **kwargs: Any) -> None:
        self._notify("on_job_end", reverse=True, **kwargs)


def launch(config_name: str, overrides: list[str], task_function, multirun: bool) -> None:
    """Run ``task_function`` as ``hydra.main`` would for ``fedprompt run [-m] <overrides>``, with Hydra's public
    API: the config loader of a Compose-API context composes the config (for a sweep, in multirun mode: the
    sweep values stay sweeps), then ``run_job`` runs the one job in ``hydra.run.dir``, or the config's sweeper
    plugin (and its launcher) runs every job in ``<hydra.sweep.dir>/<hydra.sweep.subdir>`` and writes
    ``multirun.yaml``. A run's exception is raised here; a sweep's jobs handle their own (:func:`_run_job`)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.core.utils import configure_log, run_job
    from hydra.errors import HydraException
    from hydra.types import HydraContext, RunMode
    from omegaconf.errors import OmegaConfBaseException

    from fedprompt.config import conf_dir

    mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    with initialize_config_dir(config_dir=str(conf_dir()), job_name="run", version_base=None):
        loader = GlobalHydra.instance().config_loader()
        try:
            cfg = loader.load_configuration(config_name=config_name, run_mode=mode,
                                            overrides=[*overrides, f"hydra.mode={mode.name}"])  # as hydra.main adds it
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(f"bad override in {overrides}: {' '.join(str(err).split())}") from None
        configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
        callbacks = HydraCallbacks(cfg)
        context = HydraContext(config_loader=loader, callbacks=callbacks)  # type: ignore[arg-type]  # duck-typed
        if multirun:
            callbacks.on_multirun_start(config=cfg, config_name=config_name)
            sweeper = Plugins.instance().instantiate_sweeper(config=cfg, hydra_context=context,
                                                             task_function=task_function)
            sweeper.sweep(arguments=list(cast("list[str]", OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))))
            callbacks.on_multirun_end(config=cfg, config_name=config_name)
            return
        callbacks.on_run_start(config=cfg, config_name=config_name)
        ret = run_job(task_function=task_function, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None,
                      hydra_context=context)
        callbacks.on_run_end(config=cfg, config_name=config_name, job_return=ret)
        ret.return_value  # noqa: B018 - raises the run's exception, if it raised one


def show_config(config_name: str, overrides: list[str], part: str, package: str | None, resolve: bool) -> int:
    """``--cfg job|hydra|all [--package <node>] [--resolve]``: the composed config (job: without ``hydra``,
    hydra: only it), as Hydra prints it; nothing runs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import Container, open_dict, read_write
    from omegaconf.errors import OmegaConfBaseException

    from fedprompt.config import conf_dir

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), job_name="run", version_base=None):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            OmegaConf.set_readonly(cfg.hydra, None)
            with read_write(cfg), open_dict(cfg):
                if part == "job":
                    del cfg["hydra"]
                elif part == "hydra":
                    for key in [k for k in cfg if k != "hydra"]:
                        del cfg[key]
                    with open_dict(cfg.hydra):
                        del cfg.hydra["hydra_help"], cfg.hydra["help"]
            node = cfg if package in (None, "_global_") else OmegaConf.select(cfg, package)
            if node is None:
                raise ConfigError(f"package {package!r} not found in the config")
            if not isinstance(node, Container):
                print(node)
                return 0
            if package not in (None, "_global_"):
                print(f"# @package {package}")
            if resolve:
                OmegaConf.resolve(node)
            sys.stdout.write(OmegaConf.to_yaml(node))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad override in {overrides}: {' '.join(str(err).split())}") from None
    return 0


def _launch_overrides(overrides: list[str], multirun: bool) -> list[str]:
    """Map fedprompt's own folder keys onto Hydra's: ``output_dir=X`` is the run's Hydra folder."""
    keys = {_key(o): o.partition("=")[2] for o in overrides}
    if multirun and "output_dir" in keys:
        raise ConfigError("a sweep writes one folder per job: set hydra.sweep.dir=<folder>, not output_dir")
    resume = keys.get("resume", "false").lower() == "true"
    if resume and multirun and "hydra.sweep.dir" not in keys:
        raise ConfigError("resume=true in a sweep needs hydra.sweep.dir=<the sweep's folder> (its jobs continue there)")
    if resume and not multirun and "output_dir" not in keys:
        raise ConfigError("resume=true needs output_dir=<the run's folder>, or use `fedprompt resume <run folder>`")
    if not multirun and keys.get("output_dir") and "hydra.run.dir" not in keys:
        return [*overrides, f"hydra.run.dir={keys['output_dir']}"]
    return overrides


def _run_job(cfg: DictConfig, multirun: bool, partition: dict | None = None) -> dict:
    """One job in its Hydra folder; a failure becomes a record (and error.json) so that a sweep goes on.
    ``partition``: the job's :func:`~fedprompt.commands.run.prepare` result from :func:`check_jobs`, if it has one."""
    from hydra.core.hydra_config import HydraConfig

    from fedprompt.commands.run import cmd_run
    from fedprompt.config import merge

    folder = Path(HydraConfig.get().runtime.output_dir).resolve()
    cfg = merge(cfg, {"output_dir": str(folder)})
    try:
        record = cmd_run(cfg, partition=partition)
    except FedPromptError as err:
        record = {"output_dir": str(folder), "error": str(err)}
    except Exception as err:  # noqa: BLE001 - in a sweep one broken job must not stop the others
        if not multirun:
            raise
        record = {"output_dir": str(folder), "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    if "error" in record:
        (folder / "error.json").write_text(json.dumps(record, indent=2) + "\n")
    else:
        (folder / "error.json").unlink(missing_ok=True)  # an earlier attempt's, now resumed
        if cfg.get("progress", True):
            from fedprompt.runs.report import results_table

            print(results_table(record), file=sys.stderr, flush=True)
    if multirun:
        if "error" in record:
            print(f"fedprompt run: job in {folder} failed: {record['error']}", file=sys.stderr)
        print(json.dumps(record), flush=True)
    return record
