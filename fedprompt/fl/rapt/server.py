"""RAPT's server (the service): the strategy, a central evaluation every round, the results.

The service model is loaded once; the strategy trains the soft prompt (and head) on the privatized examples
clients send. After every round the prompt is scored on ``federation.eval_split`` (first ``eval_limit``
examples), privatized here the way a user would privatize a query (same eta, random plain tokens in front,
one fixed seed so that every round is scored on the same privatized set). Round 0 is the initial prompt.
The run folder gets rounds.json / rounds.csv / accuracy.png, soft_prompt.pt (the product: the head is
dropped) and summary.json.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from fedprompt.fl.rapt.records import arrays_to_prompt, prompt_to_arrays


def check(cfg, spec) -> dict:
    """RAPT's checks before launch: label words, the privatizer's tokenizer, the model converted once."""
    from fedprompt.errors import ConfigError
    from fedprompt.fl.config import method_config
    from fedprompt.methods.rapt import first_label_tokens
    from fedprompt.models import load_tokenizer

    method = method_config(cfg)
    tokenizer = load_tokenizer(str(cfg.model.name))  # also converts an embedded model once, before the clients start
    first_label_tokens(tokenizer, spec.label_words)
    if method.privatize.embedding and method.privatize.embedding != str(cfg.model.name):
        if load_tokenizer(method.privatize.embedding).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"method.privatize.embedding={method.privatize.embedding!r} has another tokenizer than "
                              f"model={cfg.model.name!r}; RAPT sends token ids, so both must share one vocabulary")
    return {"eta": method.privatize.eta}


def run_server(grid: Grid, cfg) -> dict:
    from logging import INFO

    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import eval_examples, load_task_and_spec, reference_examples
    from fedprompt.fl.protocol import measure_references, provenance, round_accuracy
    from fedprompt.fl.rapt.strategy import RAPTStrategy
    from fedprompt.fl.records import audit_path
    from fedprompt.fl.report import RunReport
    from fedprompt.fl.run import run_folder
    from fedprompt.methods.rapt import RAPTTrainer, privatize_examples
    from fedprompt.models import SoftPrompt, load_causal_lm, load_tokenizer
    from fedprompt.privacy.dchi import load_privatizer

    fed, method = cfg.federation, method_config(cfg)
    folder = run_folder(cfg)
    task, spec = load_task_and_spec(cfg)
    tokenizer = load_tokenizer(str(cfg.model.name))
    model = load_causal_lm(str(cfg.model.name), cfg.model.get("device"), cfg.model.get("dtype"))
    privatizer, _ = load_privatizer(method.privatize, str(cfg.model.name))
    trainer = RAPTTrainer(model, tokenizer, spec, method, seed=int(cfg.seed))
    # The evaluation queries, privatized as users would send them (the server reads only this split).
    examples = eval_examples(cfg, task)

    def privatized(rows, seed: int):
        return privatize_examples(rows, tokenizer, privatizer, method.train.max_text_tokens, seed=seed,
                                  plain_tokens=method.plain_tokens, plain_vocab=method.reconstruction.plain_vocab)[0]

    queries = privatized(examples, int(cfg.seed) + 7)
    strategy = RAPTStrategy(trainer, fraction_train=float(fed.fraction_train), min_train_nodes=int(fed.min_train_clients),
                            min_available_nodes=int(fed.num_clients), audit_path=audit_path(cfg, folder))
    report = RunReport(folder, {
        "method": method.name, "task": spec.name, "model": str(cfg.model.name), "num_clients": int(fed.num_clients),
        "partition": dict(cfg.partition), "eval_split": str(fed.eval_split), "eval_n": len(queries),
        "manual_prompt": spec.manual_prompt, "eta": method.privatize.eta, **provenance(cfg),
        "expected_noise_norm": privatizer.expected_noise_norm(), "reconstruction": method.reconstruction.enabled,
        "plain_tokens": method.plain_tokens, "prompt_tokens": method.prompt.num_tokens,
        "steps_per_round": method.train.steps,
    })
    if fed.eval_references:  # the untuned prompts on the same privatized queries (validation: privatized alike)
        validation = reference_examples(cfg, task)
        private = {id(examples): queries}
        if validation is not examples:
            private[id(validation)] = privatized(validation, int(cfg.seed) + 8)
        measure_references(report, lambda rows, text: trainer.predict(private[id(rows)], untuned=text), spec, examples,
                           validation)
    prompt = SoftPrompt(method.prompt.num_tokens, trainer.soft_prompt.weight.shape[1]).to(trainer.device)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        with torch.no_grad():
            prompt.weight.copy_(arrays_to_prompt(arrays).to(prompt.weight.device))
        start = time.perf_counter()
        accuracy = round_accuracy(report, examples, server_round, int(fed.rounds), trainer.predict(queries, prompt))
        report.add(server_round, [], accuracy, len(queries), 0, time.perf_counter() - start, strategy.rounds.get(server_round))
        log(INFO, "round %d: accuracy %.4f on %d privatized queries", server_round, accuracy, len(queries))
        return MetricRecord({"accuracy": accuracy})

    result = strategy.start(grid, prompt_to_arrays(trainer.soft_prompt.weight), num_rounds=int(fed.rounds),
                            timeout=float(fed.round_timeout_s), train_config=ConfigRecord(), evaluate_fn=evaluate)
    torch.save(arrays_to_prompt(result.arrays), folder / "soft_prompt.pt")
    return report.finish(examples_received=len(trainer.examples), train_steps=trainer.steps_done,
                         soft_prompt=str(folder / "soft_prompt.pt"))
