"""``fedprompt run`` as a Hydra application: one run, or a sweep (``-m``) of runs, each in Hydra's folder.

    fedprompt run task=sst2 federation.rounds=3                   # outputs/run/<time>-sst2-feddtpt/
    fedprompt run -m partition.alpha=0.05,0.1,1,100 seed=0,1,2    # multirun/<time>/<job number>/

Hydra composes ``conf/``, expands the sweep (its basic sweeper), creates the run / job folders (with
``.hydra/``) and runs each job in turn; each job is one :func:`fedprompt.fl.run.cmd_run` (its own
SuperLink + ``flwr run``) whose run folder is the job's Hydra output folder. Before Hydra starts, every
job's config is composed and checked as ``fedprompt run`` would (keys, values, data, partition, models),
so a typo in a sweep fails at once, with no folder written. A job that fails later is reported (its line
on stderr, ``error.json`` in its folder) and the sweep goes on; the last stdout line is one JSON object:
the run's result, or the sweep's summary (also ``<sweep dir>/sweep.json``).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from fedprompt.errors import ConfigError, FedPromptError, Interrupted


def _parse(argv: Sequence[str]):
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses

    return get_args_parser().parse_args(list(argv))


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def expand_jobs(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """Each job's overrides, in the order Hydra's basic sweeper launches them (Hydra's own expansion)."""
    if not multirun:
        return [list(overrides)]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]
    except HydraException as err:
        raise ConfigError(f"bad sweep {list(overrides)}: {err}") from None


def check_jobs(jobs: list[list[str]], config_name: str, multirun: bool = False) -> None:
    """Compose and check every job before the first one starts: first the config alone, then its data, then
    that Hydra can write its folder."""
    from fedprompt.config import compose
    from fedprompt.fl.config import validate_config
    from fedprompt.fl.run import prepare, resume_point

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
    for number, cfg in enumerate(configs):
        try:
            with warnings.catch_warnings():  # e.g. flwr-datasets' re-draws: the job itself shows them
                warnings.simplefilter("ignore")
                prepare(cfg)
            if cfg.get("output_dir"):  # a named folder: refuse to overwrite an unfinished run before Hydra writes there
                folder = Path(str(cfg.output_dir))
                if folder.is_dir():
                    resume_point(OmegaConf.merge(cfg, {"output_dir": str(folder.resolve())}), folder.resolve())
        except FedPromptError as err:
            raise type(err)(f"{name(number)}{err}") from None
    check_hydra_folder(jobs[0], config_name, multirun)


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
    """``fedprompt run [Hydra flags] [key=value ...]``; returns the exit code."""
    import hydra

    from fedprompt.config import conf_dir, register_declared_defaults, rewrite_shorthands, search_path_overrides
    from fedprompt.redact import redact_overrides

    register_declared_defaults()  # the sections whose defaults are their declarations' (conf/ lists `declared`)
    args = _parse(argv)
    flags = list(argv)
    for override in args.overrides:
        flags.remove(override)
    runs = not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion)  # else Hydra answers
    try:
        overrides = redact_overrides(rewrite_shorthands(args.overrides))  # Hydra writes no key into .hydra/
        overrides += search_path_overrides()  # the user's config folder (task init's task files)
        if runs:
            overrides = _launch_overrides(overrides, bool(args.multirun))
            check_jobs(expand_jobs(overrides, bool(args.multirun)), args.config_name or "config", bool(args.multirun))
    except FedPromptError as err:
        print(f"fedprompt run: error: {err}", file=sys.stderr)
        return 2

    records: list[dict] = []
    sweep_dir: list[str] = []
    start = time.perf_counter()

    def job(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        sweep_dir[:] = [str(HydraConfig.get().sweep.dir)]
        records.append(_run_job(cfg, bool(args.multirun)))

    saved_argv = sys.argv
    sys.argv = ["fedprompt run", *flags, *overrides]
    try:
        hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)(job)()
    except Interrupted as stop:  # a sweep stops too: its later jobs would be stopped the same way
        print(f"fedprompt run: {stop}", file=sys.stderr)
        return stop.exit_code
    finally:
        sys.argv = saved_argv
    if not records:  # --help, --cfg, ...: Hydra printed what was asked
        return 0
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


def _run_job(cfg: DictConfig, multirun: bool) -> dict:
    """One job in its Hydra folder; a failure becomes a record (and error.json) so that a sweep goes on."""
    from hydra.core.hydra_config import HydraConfig

    from fedprompt.fl.run import cmd_run

    folder = Path(HydraConfig.get().runtime.output_dir).resolve()
    cfg = OmegaConf.merge(cfg, {"output_dir": str(folder)})
    try:
        record = cmd_run(cfg)
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
            from fedprompt.fl.report import results_table

            print(results_table(record), file=sys.stderr, flush=True)
    if multirun:
        if "error" in record:
            print(f"fedprompt run: job in {folder} failed: {record['error']}", file=sys.stderr)
        print(json.dumps(record), flush=True)
    return record
