"""FedAvg-BBT's / FedBPT's server: the strategy, a central evaluation of the global prompt every round, the results.

Round 0 is z = 0 (the prompt P0) with step size ``method.sigma0``. After every round (``federation.eval_every``)
the global prompt P0 + A z is scored on ``federation.eval_split`` (first ``eval_limit`` examples) through the
server's own soft-prompt black box, and the run folder gets rounds.json / rounds.csv / accuracy.png and
checkpoint.json (resume); summary.json and the final point and prompt (``bbt_prompt.npz``) at the end.
The server reads only the evaluation split; from the clients it gets only (z, sigma) and numbers.
Each client's CMA-ES is seeded per (seed, round, partition), so a resumed run repeats the same rounds.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from fedprompt.errors import ConfigError
from fedprompt.fl.bbt.records import arrays_to_point, point_to_arrays

PROMPT_FILE = "bbt_prompt.npz"
NEEDS_EMBEDS = "BBT needs a service that accepts prompt embeddings; use service.kind=inprocess"


def soft_prompt_blackbox(cfg):
    """The black box of ``service.kind``, which must take prompt embeddings (a ConfigError otherwise)."""
    from fedprompt.blackbox import SoftPromptBlackBox, make_blackbox

    if str(cfg.service.kind) != "inprocess":
        raise ConfigError(f"{NEEDS_EMBEDS} (got service.kind={cfg.service.kind})")
    blackbox = make_blackbox(cfg)
    if not isinstance(blackbox, SoftPromptBlackBox):
        blackbox.close()
        raise ConfigError(f"{NEEDS_EMBEDS} ({type(blackbox).__name__} takes texts only)")
    return blackbox


def check(cfg, spec) -> dict:
    """Checks before launch: the service takes embeddings, label words, the prompt fits the model's context."""
    from transformers import AutoConfig

    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import client_data
    from fedprompt.methods.post.tuning import check_prompt_fits
    from fedprompt.models import encode_label_words, load_tokenizer, materialize

    method = method_config(cfg)
    if str(cfg.service.kind) != "inprocess":
        raise ConfigError(f"{NEEDS_EMBEDS} (got service.kind={cfg.service.kind})")
    name = str(cfg.model.name)
    tokenizer = load_tokenizer(name)  # also converts an embedded model once, before the clients start
    encode_label_words(tokenizer, spec.label_words)
    model_config = AutoConfig.from_pretrained(materialize(name))
    clients = client_data(cfg).partition.clients
    longest = max(len(ids) for c in clients for ids in tokenizer([spec.format(e) for e in c])["input_ids"])
    check_prompt_fits(method.prompt_tokens, longest, getattr(model_config, "max_position_embeddings", None))
    hidden = int(model_config.hidden_size)
    return {"prompt_dim": method.prompt_tokens * hidden,
            "queries_per_client_round_max": method.evaluations_per_round() * (method.batch_size or max(map(len, clients)))}


def predict_soft_prompt(blackbox, spec, examples, soft_prompt: np.ndarray) -> np.ndarray:
    """Predicted class per example under a soft prompt (with the task's manual prompt in the text)."""
    result = blackbox.classify_embeds([spec.format(e) for e in examples], list(spec.label_words), soft_prompt)
    return np.asarray(result.predictions)


def run_server(grid: Grid, cfg) -> dict:
    from fedprompt.blackbox.scoring import predict_prompt
    from fedprompt.fl.bbt.strategy import BBTStrategy
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import eval_examples, load_task_and_spec, reference_examples
    from fedprompt.fl.protocol import measure_references, provenance
    from fedprompt.fl.records import audit_path
    from fedprompt.fl.report import RunReport
    from fedprompt.fl.rounds import Federation, RoundDriver, Scored
    from fedprompt.fl.run import run_folder
    from fedprompt.methods.bbt.projection import projection_for

    fed, federation = cfg.federation, Federation.from_cfg(cfg)
    method = method_config(cfg)
    folder = run_folder(cfg)
    task, spec = load_task_and_spec(cfg)
    examples = eval_examples(cfg, task)  # the server reads only the evaluation split, never client data
    blackbox = soft_prompt_blackbox(cfg)
    projection = projection_for(method, blackbox, spec.manual_prompt, int(cfg.seed))
    strategy = BBTStrategy(method.mode, method.intrinsic_dim, method.sigma0, seed=int(cfg.seed),
                           audit_path=audit_path(cfg, folder), **federation.fedavg_kwargs())
    report = RunReport(folder, {
        "method": method.name, "mode": method.mode, "task": spec.name, "model": str(cfg.model.name),
        "service": str(cfg.service.kind), "num_clients": int(fed.num_clients), "partition": dict(cfg.partition),
        "eval_split": str(fed.eval_split), "eval_n": len(examples), "manual_prompt": spec.manual_prompt,
        "intrinsic_dim": method.intrinsic_dim, "prompt_tokens": method.prompt_tokens, "init": method.init,
        "popsize": method.popsize, "local_iterations": method.local_iterations, "batch_size": method.batch_size,
        "projection_std": projection.std, "projection_seed": projection.seed, **provenance(cfg),
    })
    # resume=true: the report so far (and the server's black-box usage) is restored here
    driver = RoundDriver(cfg, folder, report, strategy, examples, blackbox.usage)
    if fed.eval_references:  # the manual prompt or no instruction, without a soft prompt
        measure_references(report, lambda rows, text: predict_prompt(blackbox, spec, rows, text), spec, examples,
                           reference_examples(cfg, task))

    def score(server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        z, sigma = arrays_to_point(arrays, method.intrinsic_dim)
        log(INFO, "round %d: the global prompt's |z| %.3f, sigma %.4f", server_round, float(np.linalg.norm(z)), sigma)
        if not due:
            return Scored()
        return Scored(predictions=predict_soft_prompt(blackbox, spec, examples, projection.prompt(z)),
                      queries=len(examples))

    try:
        result = driver.run(grid, point_to_arrays(np.zeros(method.intrinsic_dim, np.float32), method.sigma0), score)
    finally:
        blackbox.close()
    z, sigma = arrays_to_point(result.arrays, method.intrinsic_dim)
    path = folder / PROMPT_FILE
    np.savez(path, z=z, sigma=np.float32(sigma), prompt=projection.prompt(z))
    return report.finish(prompt_file=str(path), final_sigma=sigma, server_usage=blackbox.usage.to_dict())
