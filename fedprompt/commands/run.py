"""``fedprompt run``: check everything, then run the federated simulation through ``flwr run``.

Checks first, in one line each and before any model is loaded: the method, federation and partition
values, the service settings, the task's data (k-shot sample, the partition itself, the public and
evaluation splits), the model names and label words. Then the run folder gets the config
(config.yaml, run_config.toml: the JSON of the resolved config in the one run-config key), the
partition's sizes (partition.json), and the Flower log (flower.log, superlink.log); the ServerApp writes
rounds.json/csv, accuracy.png and summary.json there; the returned dict is summary.json plus the
launcher's own figures. After every round the server writes checkpoint.json; ``resume=true`` (or
``fedprompt resume <folder>``) continues from it (fedprompt.fl.checkpoint).

Every process of the run carries the run's token and is stopped with it (fedprompt.commands.tree): at the end,
on Ctrl-C, SIGTERM or SIGHUP, and by a watchdog if the launcher is killed. status.json says how the run
ended, "interrupted at round r of n" included (fedprompt.commands.status).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, cast

from omegaconf import DictConfig, OmegaConf

from fedprompt.errors import ConfigError, Interrupted
from fedprompt.runs.report import run_folder


def app_dir() -> Path:
    """The Flower app folder: the checkout that holds fedprompt's pyproject.toml with [tool.flwr.app]."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise ConfigError(f"fedprompt run needs fedprompt's source checkout (pyproject.toml with [tool.flwr.app] "
                          f"in {root}); install it with `pip install -e .` from the repository")
    return root


def prepare(cfg: DictConfig) -> dict:
    """All checks that need data or tokenizers but no model weights, after the config's own and (resume=true)
    the checkpoint's; returns the partition's summary."""
    from fedprompt.registry import federated_method
    from fedprompt.runs.data import (
        check_no_leak,
        checked_partition,
        eval_examples,
        load_task_and_spec,
        overlap_excluded,
        public_examples,
        training_examples,
    )
    from fedprompt.runs.run_config import validate_config

    validate_config(cfg)
    check_resume(cfg)
    task, spec = load_task_and_spec(cfg)
    train = training_examples(cfg, task, spec)  # k-shot larger than a class: a DataError naming the class
    partition = checked_partition(cfg, train, spec.num_labels)
    if not eval_examples(cfg, task):
        raise ConfigError(f"the evaluation split {cfg.federation.eval_split!r} is empty")
    check_no_leak(cfg, task, train, public_examples(cfg, task, spec))  # by content, not by split name
    facts = federated_method(cfg.method.name).load("checks")(cfg, spec)
    return {"num_clients": len(partition.clients), "train_examples": len(train), **facts, **partition.summary(),
            "eval_overlap_excluded": overlap_excluded(cfg, task)}


def write_run_config(cfg: DictConfig, folder: Path) -> Path:
    import tomli_w

    from fedprompt.runs.run_config import RUN_CONFIG_KEY, serialize_config

    path = folder / "run_config.toml"
    path.write_text(tomli_w.dumps({RUN_CONFIG_KEY: serialize_config(cfg)}))  # a file: no shell quoting of JSON
    return path


# Ctrl-C, `kill <pid>` and a closed terminal all stop a run the same way.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """STOP_SIGNALS raise :class:`Interrupted` here, so that the run's processes are stopped on the way out and
    the checkpoint stays for resume (the default SIGTERM and SIGHUP would end this process and nothing else)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def recorded_status(folder: Path, checkpoint) -> Iterator[None]:
    """status.json says "running" while inside, then how it ended: completed, failed, or interrupted at the
    round a resume continues from (then the Interrupted raised carries that message)."""
    from fedprompt.commands.status import checkpoint_round, mark_interrupted, write_status

    write_status(folder, "running", pid=os.getpid(), resumed_from_round=None if checkpoint is None else checkpoint.round)
    try:
        yield
    except KeyboardInterrupt as stop:  # an Interrupted, or a plain Ctrl-C where no handler could be set
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        status = mark_interrupted(folder, signal.Signals(signum).name)
        raise Interrupted(signum, status.get("message", "")) from None
    except BaseException as err:
        write_status(folder, "failed", error=" ".join(f"{type(err).__name__}: {err}".split())[:2000])
        raise
    done, total = checkpoint_round(folder)
    write_status(folder, "completed", round=done, num_rounds=total)


def finished(folder: Path, checkpoint) -> bool:
    """Whether ``folder`` holds a run that completed every round (its result.json was written)."""
    return checkpoint is not None and checkpoint.round == checkpoint.num_rounds and (folder / "result.json").is_file()


def check_resume(cfg: DictConfig) -> None:
    """With ``resume=true``, refuse a damaged checkpoint or one made with other settings early: before the data,
    the tokenizers or the SuperLink are touched, and before resume_point changes anything in the folder."""
    from fedprompt.config import merge
    from fedprompt.fl.checkpoint import check_resumable
    from fedprompt.runs.run_config import serialize_config

    if cfg.get("resume") and cfg.get("output_dir"):
        folder = Path(str(cfg.output_dir)).resolve()
        check_resumable(folder, json.loads(serialize_config(merge(cfg, {"output_dir": str(folder)}))))


def resume_point(cfg: DictConfig, folder: Path):
    """The checkpoint a run in ``folder`` starts from (None: round 0), after clearing what a new run replaces.

    ``resume=true`` continues the folder's checkpoint if its settings match (else a ConfigError); without
    it, a folder holding an unfinished run is refused rather than overwritten (nothing computed is lost).
    """
    import shutil

    from fedprompt.fl.checkpoint import CHECKPOINT, CLIENTS, Checkpoint, check_resumable
    from fedprompt.runs.run_config import serialize_config

    if cfg.get("resume"):
        checkpoint = check_resumable(folder, json.loads(serialize_config(cfg)))  # refused: nothing changed yet
        if not finished(folder, checkpoint):
            (folder / "summary.json").unlink(missing_ok=True)  # a stop after it was written: rewritten at the end
        return checkpoint
    # A finished run's checkpoint is replaced below, damaged or not; an unfinished one (or a damaged one: it can
    # not say) is refused, so nothing computed is overwritten.
    checkpoint = None if (folder / "result.json").is_file() else Checkpoint.read(folder)
    if checkpoint is not None:
        raise ConfigError(f"{folder} holds an unfinished run (round {checkpoint.round} of {checkpoint.num_rounds} done); "
                          f"continue it with `fedprompt resume {folder}` (or resume=true), or choose another output_dir")
    for stale in ("summary.json", "replies.jsonl", "result.json", CHECKPOINT):  # a reused output_dir must not
        (folder / stale).unlink(missing_ok=True)  # pass off an old result
    shutil.rmtree(folder / CLIENTS, ignore_errors=True)
    return None


def cmd_run(cfg: DictConfig, partition: dict | None = None) -> dict:
    """One run in ``cfg.output_dir`` (else a new folder); the record of summary.json and the launcher's figures.

    ``partition``: :func:`prepare`'s result for this config when the caller already checked it (``fedprompt
    run`` checks every job of a sweep before the first starts): then only the resume check is redone here,
    since the folder is known now, and the data, partition and tokenizers are not loaded a second time."""
    from fedprompt.runs.protocol import git_state

    start = time.perf_counter()
    root = app_dir()
    code = git_state()  # the checkout the FAB is packed from, before it can change under a long run
    if partition is None:
        partition = prepare(cfg)
    else:
        check_resume(cfg)
    cfg, folder, run_config, checkpoint = start_run_folder(cfg, partition)
    if finished(folder, checkpoint):
        return json.loads((folder / "result.json").read_text())  # resume=true on a finished run: nothing to run
    # The handlers outermost: a signal anywhere inside, the clean-up included, raises rather than kills.
    with signals_interrupt(), recorded_status(folder, checkpoint):
        outcome = simulate(cfg, root, folder, run_config, checkpoint)
        return finish_run(folder, outcome, start, checkpoint, code)


def simulate(cfg: DictConfig, root: Path, folder: Path, run_config: Path, checkpoint):
    """The Flower run: a SuperLink of its own and ``flwr run``, all of it one process tree stopped as one."""
    from fedprompt.commands.launch import flwr_run, local_superlink
    from fedprompt.commands.tree import RunProcesses

    fed = cfg.federation
    with RunProcesses(folder) as tree, \
            local_superlink(folder / "superlink.log", cwd=folder, port=int(fed.superlink_port), extra_env=tree.env) as env, \
            (folder / "flower.log").open("a" if checkpoint else "w", buffering=1) as log:  # line-buffered: a kill loses nothing
        return flwr_run(root, run_config, int(fed.num_clients), int(fed.client_cpus), float(fed.client_gpus),
                        env, log, echo=sys.stderr if cfg.get("progress", True) or cfg.get("verbose") else None,
                        echo_all=bool(cfg.get("verbose")))


def start_run_folder(cfg: DictConfig, partition: dict):
    """The run folder with the config, the partition's sizes and the run config; returns the config with
    ``output_dir`` set, the folder, the run config's path and the checkpoint to resume from (or None)."""
    from fedprompt.config import merge
    from fedprompt.redact import redact_config

    folder = run_folder(cfg)
    cfg = merge(redact_config(cfg), {"output_dir": str(folder)})  # what follows writes the config
    checkpoint = resume_point(cfg, folder)
    if not finished(folder, checkpoint):
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (folder / "partition.json").write_text(json.dumps(partition, indent=2) + "\n")
    return cfg, folder, write_run_config(cfg, folder), checkpoint


def finish_run(folder: Path, outcome, start: float, checkpoint=None, code: dict | None = None) -> dict:
    """summary.json of a completed run plus the launcher's figures (result.json); a clear error otherwise.
    ``code``: the launching checkout's git state, added to summary.json (the server cannot see it)."""
    from fedprompt.commands.launch import SimulationError

    summary_path = folder / "summary.json"
    if outcome.status == "finished:completed" and not summary_path.is_file():
        raise SimulationError(f"Flower run {outcome.run_id} completed, but its results are not in {folder}: the ServerApp "
                              "writes them on the SuperLink's host (submit from there, or use an output_dir both share)")
    if outcome.status != "finished:completed" or not summary_path.is_file():
        raise SimulationError(f"Flower run {outcome.run_id} ended {outcome.status!r}: {outcome.details or 'no details'}; "
                              f"see {folder / 'flower.log'}")
    summary = json.loads(summary_path.read_text())
    if code:
        summary.update(code)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    if summary.get("client_replies") == 0:
        raise SimulationError(f"no client replied in any of the {summary.get('rounds')} rounds "
                              f"({summary.get('failures')} failures); see {folder / 'flower.log'}")
    record = {
        **summary,
        "output_dir": str(folder),
        "run_id": str(outcome.run_id),
        "wall_s": round(time.perf_counter() - start, 3),
        "flwr_run_s": round(outcome.elapsed_s, 3),
        "resumed_from_round": None if checkpoint is None else checkpoint.round,
    }
    (folder / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def cmd_resume(folder: Path, overrides: list[str]) -> dict:
    """``fedprompt resume <run folder> [key=value ...]``: the folder's run, from its last completed round.

    The config is the folder's config.yaml; overrides may change only how the run is launched
    (fedprompt.runs.resume.VOLATILE), anything else is refused when the checkpoint is compared.
    """
    from fedprompt.config import merge

    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"{folder} is not a run folder (no config.yaml); give the folder `fedprompt run` wrote")
    try:  # a config.yaml that holds a list fails here (a list cannot take the dotlist's mapping): a DictConfig
        cfg = cast(DictConfig, OmegaConf.merge(OmegaConf.load(folder / "config.yaml"), OmegaConf.from_dotlist(list(overrides))))
    except Exception as err:  # noqa: BLE001 - a malformed file or override: one line
        raise ConfigError(f"cannot read {folder / 'config.yaml'} with overrides {overrides}: {err}") from None
    return cmd_run(merge(cfg, {"resume": True, "output_dir": str(folder.resolve())}))
