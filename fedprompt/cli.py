"""``fedprompt`` command line: ``fedprompt <command> [key=value ...]`` (Hydra-style overrides).

Commands: ``eval`` (manual or zero-shot prompt on a split), ``serve``, ``run`` (a Hydra application:
``-m`` sweeps, Hydra's output folders; fedprompt.commands.hydra_app), ``resume`` and ``report`` (they take a
folder first). Bad input is reported in one line, before any model is loaded; the last line of a
successful command is one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from fedprompt.config import check_writable_dir, compose, load_task_checked, output_dir, validate_common
from fedprompt.errors import ConfigError, FedPromptError, Interrupted
from fedprompt.redact import redact_overrides

USAGE = """usage: fedprompt <command> [key=value ...]

commands:
  eval    evaluate the task's manual prompt (or prompt="...", or prompt="" for zero-shot) on a split;
          service.kind=http|openai service.url=... scores it on that server instead of loading the model
  serve   serve model= as a black-box LLM API (OpenAI-compatible + /v1/classify), see docs/blackbox.md
  run     a federated simulation (Flower, Ray backend, via `flwr run`): method=feddtpt|post|rapt|fedprompt|bbt|bdpl;
          a Hydra app: `-m` sweeps (one run per job under multirun/), `--cfg job` shows the config
  resume  continue a stopped run from its last completed round: fedprompt resume <run folder>
  report  tables (mean and 95% CI over seeds, gain over the reference) and plots: fedprompt report <folder>
  deploy  the same run on a Flower deployment: SuperLink + N SuperNodes over TLS, see docs/deployment.md
  partition  write the run's partitions, one folder per client (output_dir=DIR: DIR/partition_<i>/), for
          SuperNodes that read only their own data (node config data-dir); see docs/deployment.md
  distill a small student of model= (kept layers, distilled on public text), for POST; see docs/post.md
  transfer  lift a student's soft prompt (transfer.prompt=...) to model= with POST's transfer
  task    task init <folder>: a config for a folder of jsonl files, its prompt, template and label words chosen
          on the validation split, written to $FEDPROMPT_CONF_DIR/task/ (else ~/.config/fedprompt); docs/tasks.md

examples:
  fedprompt eval task=sst2 split=test
  fedprompt eval task=trec split=validation limit=200 prompt="Classify the question."
  fedprompt eval task=mytask data_dir=/path/to/folders model=HuggingFaceTB/SmolLM2-360M-Instruct
  fedprompt task init /path/to/folders/mytask limit=200
  fedprompt serve model=smollm2-135m host=127.0.0.1 port=8000 service.api_keys_file=keys.txt
  fedprompt run method=feddtpt task=sst2 federation.num_clients=10 federation.rounds=3 partition=dirichlet partition.alpha=1.0
  fedprompt deploy task=sst2 federation.num_clients=3 service.kind=http
  fedprompt partition task=sst2 federation.num_clients=3 partition=dirichlet partition.alpha=1.0 output_dir=parts
  fedprompt run -m partition.alpha=0.05,0.1,1,100 seed=0,1,2 partition.k_shot=8 federation.rounds=2
  fedprompt resume outputs/run/20250101-120000-sst2-feddtpt
  fedprompt report multirun/20250101-120000
  fedprompt distill model=smollm2-135m distill.steps=300
  fedprompt run method=post task=sst2 method.privacy.epsilon=8 partition=iid partition.k_shot=null
  fedprompt transfer task=sst2 transfer.prompt=outputs/run/<run>/prompt.safetensors

data: data_dir=<folder with one sub-folder per task>, else $FEDPROMPT_DATA_DIR, else the HF hub.
"""


FOLDER_USAGE = {"resume": "fedprompt resume <run folder> [key=value ...]: only launch settings may change "
                          "(progress, verbose, federation.round_timeout_s, federation.superlink_port, service.api_key)",
                "report": "fedprompt report <run or sweep folder> [out=<folder>]: report.md, report.csv, report.json "
                          "and plots in <folder>/report/ (docs/experiments.md, Reports)"}


def command_help(command: str, overrides: Sequence[str] = ()) -> str:
    """What ``fedprompt <command> --help`` prints: its usage line, then every key of every section it reads,
    with its type, value and one-line help, from the sections' declarations (fedprompt.confhelp); the other
    overrides given choose what is shown (``fedprompt run method=bdpl --help``: BDPL's keys)."""
    from fedprompt.confhelp import command_keys

    if command in FOLDER_USAGE:
        return f"usage: {FOLDER_USAGE[command]}"
    usage = f"usage: fedprompt {command} [key=value ...]"
    if command == "task":
        from fedprompt.task_init import USAGE as task_usage

        usage = f"usage: {task_usage}"
        overrides = ()
    keys = command_keys(command, [o for o in overrides if o not in ("-h", "--help")])
    return f"{usage}\n\nthe keys it reads (key: type = value  help); key=value overrides any of them:\n{keys}"


def cmd_eval(cfg: DictConfig) -> dict:
    """Accuracy of a prompt on a split, scored where ``service.kind`` says: this process (``inprocess``,
    the model loaded here) or a black box (``http``: a ``fedprompt serve``; ``openai``: any OpenAI-compatible
    server) at ``service.url``, which then receives every request. The JSON names the service and URL.

    ``task.calibration=mean`` (the default of a task without a config file of its own, conf/task/custom.yaml)
    first scores ``task.calibration_examples`` training rows with the same prompt and divides the model's
    label preference out of every score (fedprompt.models.calibration); the JSON then carries the bias and
    ``uncalibrated_accuracy``. ``majority_accuracy`` (always the most frequent class) is the floor to beat."""
    from fedprompt.blackbox.settings import ClientSettings
    from fedprompt.models.calibration import CalibrationSettings, calibration_examples, majority_rate

    validate_common(cfg)
    check_writable_dir(cfg.get("output_dir") or Path("outputs") / "eval")
    client = ClientSettings.from_config(cfg)  # bad service.* values fail here, before data or model
    calibration = CalibrationSettings.from_task(cfg.task)
    task = load_task_checked(cfg)
    spec = task.spec.with_chat_format(cfg.model.get("chat_format"))
    examples = task.split(str(cfg.split))  # reads and validates every row before the model loads
    if cfg.limit is not None:
        examples = examples[: int(cfg.limit)]
    calib = calibration_examples(task.split("train") if calibration.enabled else [], calibration, spec.num_labels,
                                 int(cfg.seed))
    prompt = None if cfg.prompt is None else str(cfg.prompt)
    if client.kind == "inprocess":
        out, record, bias = _eval_inprocess(cfg, spec, examples, prompt, calib)
    else:
        out, record, bias = _eval_blackbox(cfg, client, spec, examples, prompt, calib)
    record.update({"task": spec.name, "split": str(cfg.split), "prompt": spec.manual_prompt if prompt is None else prompt,
                   "majority_accuracy": majority_rate([e.label for e in examples]),
                   "calibration": _calibration_record(calibration, calib, bias, int(cfg.seed)),
                   "data": task.source, "output_dir": str(out)})
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if record["accuracy"] < record["majority_accuracy"]:  # said where it is seen, not only in the JSON
        print(f"fedprompt eval: note: accuracy {record['accuracy']:.3f} is below always answering the most frequent "
              f"class ({record['majority_accuracy']:.3f}); a prompt chosen on validation may do better: "
              "fedprompt task init <folder> (docs/tasks.md)", file=sys.stderr)
    return record


def _calibration_record(settings, calib, bias, seed: int) -> dict:
    if bias is None:
        return {"method": "none"}
    return {"method": settings.method, "split": "train", "examples": len(calib), "seed": seed,
            "bias": [round(float(b), 4) for b in bias]}


def _eval_inprocess(cfg: DictConfig, spec, examples, prompt: str | None, calib) -> tuple[Path, dict, object]:
    from fedprompt.methods.baselines import evaluate_prompt
    from fedprompt.models import PromptedClassifier, encode_label_words, load_causal_lm, load_tokenizer
    from fedprompt.models.calibration import estimate_bias

    tokenizer = load_tokenizer(str(cfg.model.name))
    encode_label_words(tokenizer, spec.label_words)  # a label word that tokenizes to nothing: fail now
    out = output_dir(cfg, "eval")
    model = load_causal_lm(str(cfg.model.name), cfg.model.get("device"), cfg.model.get("dtype"))
    classifier = PromptedClassifier(model, tokenizer, spec, batch_size=int(cfg.batch_size))
    bias = estimate_bias(lambda rows: classifier.log_scores(rows, prompt), calib)  # None without calibration
    result = evaluate_prompt(classifier, examples, prompt, bool(cfg.calibrate), bool(cfg.progress), bias=bias)
    return out, {
        **result.to_dict(),
        "model": str(cfg.model.name),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "service": "inprocess",
        "url": None,
    }, bias


def _eval_blackbox(cfg: DictConfig, client, spec, examples, prompt: str | None, calib) -> tuple[Path, dict, object]:
    """Score through ``make_blackbox(cfg)``: the service holds the model; nothing is loaded here. The
    calibration rows (if any) are scored first, through the same service (they count in ``usage``)."""
    import numpy as np

    from fedprompt.blackbox import BlackBoxError, make_blackbox
    from fedprompt.models.calibration import estimate_bias
    from fedprompt.models.classifier import EvalResult

    inputs = [spec.format(e, prompt) for e in examples]
    out = output_dir(cfg, "eval")
    step = client.chunk_size  # texts per classify call: the progress bar moves once per call
    floored = 0

    def score(texts: list[str], bar=None) -> np.ndarray:
        nonlocal floored
        rows = []
        for first in range(0, len(texts), step):
            result = service.classify(texts[first : first + step], spec.label_words)
            rows.append(result.logprobs)
            if result.floored is not None:
                floored += int(result.floored.any(axis=1).sum())
            if bar is not None:
                bar.update(len(result.predictions))
        return np.concatenate(rows) if rows else np.zeros((0, len(spec.label_words)), np.float32)

    with make_blackbox(cfg) as service:
        url = service.url
        print(f"fedprompt eval: scoring {len(inputs)} examples through service.kind={client.kind} at {url}",
              file=sys.stderr)
        bias = estimate_bias(lambda rows: score([spec.format(e, prompt) for e in rows]), calib)
        floored = 0  # counted on the evaluated rows only
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(inputs), desc=f"eval {spec.name}", unit="ex", dynamic_ncols=True)
        start = time.perf_counter()
        try:
            scores = score(inputs, bar)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        if client.kind == "openai":
            served = service.model
        else:  # fedprompt serve names its model in /v1/models
            try:
                served = str(service.transport.request("GET", "/v1/models").body["data"][0]["id"])
            except (BlackBoxError, KeyError, IndexError, TypeError):
                served = str(cfg.model.name)
        usage = service.usage.to_dict()
    result = EvalResult.from_scores(scores, [e.label for e in examples], inputs, seconds, bool(cfg.calibrate), bias)
    record = {**result.to_dict(), "model": served, "dtype": None, "device": None, "service": client.kind, "url": url,
              "usage": usage}
    if client.kind == "openai":
        # Rows where some label was outside the server's top-k (first_token mode): its score is an upper bound.
        record["floored_rows"] = floored
    return out, record, bias


def cmd_serve(cfg: DictConfig) -> dict:
    from fedprompt.blackbox.cli_serve import cmd_serve as serve  # lazy: fastapi/uvicorn only when serving

    return serve(cfg)


def cmd_resume(folder: Path, overrides: list[str]) -> dict:
    from fedprompt.commands.run import cmd_resume as resume

    return resume(folder, overrides)


def cmd_distill(cfg: DictConfig) -> dict:
    from fedprompt.commands.post import cmd_distill as distill  # lazy: torch and the models only here

    return distill(cfg)


def cmd_transfer(cfg: DictConfig) -> dict:
    from fedprompt.commands.post import cmd_transfer as transfer

    return transfer(cfg)


def cmd_deploy(cfg: DictConfig) -> dict:
    from fedprompt.commands.deploy import cmd_deploy as deploy  # lazy: Flower only when deploying

    return deploy(cfg)


def cmd_partition(cfg: DictConfig) -> dict:
    from fedprompt.commands.partition import cmd_partition as partition  # lazy: the partitioners only here

    return partition(cfg)


def cmd_task(args: list[str]) -> dict:
    from fedprompt.task_init import cmd_task as task  # lazy: the models only here

    return task(args)


def cmd_report(folder: Path, overrides: list[str]) -> dict:
    from fedprompt.results import cmd_report as report  # lazy: pandas and matplotlib only when reporting

    return report(folder, overrides)


COMMANDS: dict[str, Callable[[DictConfig], dict]] = {"eval": cmd_eval, "serve": cmd_serve, "deploy": cmd_deploy,
                                                     "distill": cmd_distill, "transfer": cmd_transfer,
                                                     "partition": cmd_partition}
# Commands whose first argument is a folder (a run's or a sweep's), not an override.
FOLDER_COMMANDS: dict[str, Callable[[Path, list[str]], dict]] = {"resume": cmd_resume, "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command, overrides = args[0], args[1:]
    from fedprompt.confhelp import COMMAND_SECTIONS  # `fedprompt <command> --help`

    if ("-h" in overrides or "--help" in overrides) and command in {*COMMAND_SECTIONS, *FOLDER_USAGE}:
        try:
            print(command_help(command, overrides))
        except FedPromptError as err:
            print(f"fedprompt {command}: error: {err}", file=sys.stderr)
            return 2
        return 0
    if command == "run":  # a Hydra application with Hydra's own command line (-m, --cfg, hydra.*)
        from fedprompt.commands.hydra_app import main as run_app  # lazy: Flower and Ray only when simulating

        return run_app(overrides)
    if command not in COMMANDS and command not in FOLDER_COMMANDS and command != "task":
        known = sorted(["run", "task", *COMMANDS, *FOLDER_COMMANDS])
        print(f"fedprompt: unknown command {command!r}; choose one of {known}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        if command == "task":
            record = cmd_task(overrides)
        elif command in FOLDER_COMMANDS:
            if not overrides or "=" in overrides[0]:
                raise ConfigError(f"usage: fedprompt {command} <folder> [key=value ...]")
            record = FOLDER_COMMANDS[command](Path(overrides[0]), overrides[1:])  # keys: redact_config in cmd_run
        else:
            record = COMMANDS[command](compose(redact_overrides(overrides)))
    except FedPromptError as err:
        print(f"fedprompt {command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # `fedprompt resume` stopped again
        print(f"fedprompt {command}: {stop}", file=sys.stderr)
        return stop.exit_code
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
