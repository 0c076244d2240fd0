"""BDPL's server: the strategy (K activated clients a round, FedAvg of their logits; K = 1 is FedOne), a
central evaluation of the argmax prompt every round, and the results.

Round 0 is the uniform policy (all logits 0; its argmax prompt is the first candidate in every slot).
After every round the global policy's argmax prompt is scored on ``federation.eval_split`` (first
``eval_limit`` examples) through the server's own black box, and the run folder gets rounds.json /
rounds.csv / accuracy.png / checkpoint.json (resume); at the end summary.json and the final logits
(``logits.npy``, with the candidate words in ``candidates.json``). Sampling is a function of
(seed, round) and the clients' steps of (seed, round, partition), so the server resumes from the
global logits alone.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedprompt.fl.bdpl.records import arrays_to_logits, logits_to_arrays

LOGITS_FILE = "logits.npy"
CANDIDATES_FILE = "candidates.json"


def check(cfg, spec) -> dict:
    """BDPL's checks before launch: the candidate vocabulary, K against the federation, the service."""
    from fedprompt.errors import ConfigError
    from fedprompt.fl.bdpl.client import vocab_model
    from fedprompt.fl.config import method_config
    from fedprompt.methods.bdpl import candidate_vocab
    from fedprompt.models import encode_label_words, load_tokenizer

    method = method_config(cfg)
    fed = cfg.federation
    if method.clients_per_round > int(fed.num_clients):
        raise ConfigError(f"method.clients_per_round={method.clients_per_round} but federation.num_clients="
                          f"{fed.num_clients}; activate at most num_clients clients a round")
    available = int(fed.get("min_available_clients") or fed.num_clients)
    if method.clients_per_round > available:
        raise ConfigError(f"method.clients_per_round={method.clients_per_round} > federation.min_available_clients="
                          f"{available}: a round could find too few clients; raise min_available_clients")
    if int(fed.min_replies) > method.clients_per_round:
        raise ConfigError(f"federation.min_replies={fed.min_replies} but a round activates only "
                          f"method.clients_per_round={method.clients_per_round} clients: every round would be "
                          "skipped; lower min_replies or raise clients_per_round")
    name = vocab_model(cfg)
    vocab = candidate_vocab(load_tokenizer(name), method)  # also converts an embedded model once, before the clients
    if cfg.service.kind == "http":  # the service must answer now, not after Ray has started
        from fedprompt.blackbox import make_blackbox

        with make_blackbox(cfg, retries=0) as service:
            service.health()
    if cfg.service.kind == "inprocess":
        encode_label_words(load_tokenizer(str(cfg.model.name)), spec.label_words)
    return {"vocab_model": name, "candidates": len(vocab)}


def run_server(grid: Grid, cfg) -> dict:
    from fedprompt.blackbox import make_blackbox
    from fedprompt.blackbox.scoring import predict_prompt
    from fedprompt.fl.bdpl.client import vocab_model
    from fedprompt.fl.bdpl.strategy import BDPLFedAvg
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import eval_examples, load_task_and_spec, reference_examples
    from fedprompt.fl.protocol import measure_references, provenance
    from fedprompt.fl.records import audit_path
    from fedprompt.fl.report import RunReport
    from fedprompt.fl.rounds import Federation, RoundDriver, Scored
    from fedprompt.fl.run import run_folder
    from fedprompt.methods.bdpl import BDPLClient, argmax_prompt, candidate_vocab
    from fedprompt.models import load_tokenizer

    fed, federation = cfg.federation, Federation.from_cfg(cfg)
    method = method_config(cfg)
    folder = run_folder(cfg)  # `fedprompt run` sets output_dir; `flwr run .` by hand: outputs/run/...
    task, spec = load_task_and_spec(cfg)
    examples = eval_examples(cfg, task)  # the server reads only the evaluation split, never client data
    vocab = candidate_vocab(load_tokenizer(vocab_model(cfg)), method)
    policy = BDPLClient(method, vocab)  # only for the shape and the initial logits; the server runs no steps
    blackbox = make_blackbox(cfg)
    # fraction_train and min_train_clients do not apply: method.clients_per_round clients a round
    strategy = BDPLFedAvg(clients_per_round=method.clients_per_round, seed=int(cfg.seed),
                          min_replies=federation.min_replies, min_available_nodes=federation.min_available_clients,
                          vocab=vocab, audit_path=audit_path(cfg, folder))
    report = RunReport(folder, {
        "method": method.name, "variant": "fedone" if method.clients_per_round == 1 else "federated-bdpl",
        "task": spec.name, "model": str(cfg.model.name), "service": str(cfg.service.kind),
        "num_clients": int(fed.num_clients), "clients_per_round": method.clients_per_round,
        "partition": dict(cfg.partition), "eval_split": str(fed.eval_split), "eval_n": len(examples),
        "manual_prompt": spec.manual_prompt, "prompt_length": method.prompt_length, "candidates": len(vocab),
        "vocab_model": vocab_model(cfg), "samples_per_step": method.samples_per_step,
        "local_steps": method.local_steps, "batch_size": method.batch_size, "lr": method.lr,
        "optimizer": method.optimizer, "query_budget": method.query_budget, **provenance(cfg),
    })
    # resume=true: the report so far (and the server's black-box usage) is restored here
    driver = RoundDriver(cfg, folder, report, strategy, examples, blackbox.usage)
    if fed.eval_references:
        measure_references(report, lambda rows, text: predict_prompt(blackbox, spec, rows, text), spec, examples,
                           reference_examples(cfg, task))

    final: dict[str, np.ndarray] = {}

    def score(server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        logits = arrays_to_logits(arrays, policy.shape)
        final["logits"] = logits
        words = [vocab[int(i)] for i in argmax_prompt(logits)]
        return Scored(words, predict_prompt(blackbox, spec, examples, words) if due else None, len(examples))

    try:
        driver.run(grid, logits_to_arrays(policy.initial_logits()), score)
    finally:
        blackbox.close()
    np.save(folder / LOGITS_FILE, final["logits"])
    (folder / CANDIDATES_FILE).write_text(json.dumps(vocab) + "\n")
    return report.finish(server_usage=blackbox.usage.to_dict(), logits_file=str(folder / LOGITS_FILE))
