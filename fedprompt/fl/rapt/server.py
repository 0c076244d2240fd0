"""RAPT's server (the service): the strategy, a central evaluation, the results.

The service model is loaded once; the strategy trains the soft prompt (and head) on the privatized examples
clients send. The rounds run through the shared round driver (fedprompt.fl.rounds): federation.min_replies,
min_available_clients and eval_every hold as for every method, and checkpoint.json is written after every
round with the trainer's state, so ``fedprompt resume`` continues a RAPT run from its last completed round.
Round 0, every ``federation.eval_every``-th round and the last are scored on ``federation.eval_split`` (first
``eval_limit`` examples), privatized here the way a user would privatize a query (same eta, random plain
tokens in front, one fixed seed so that every round is scored on the same privatized set). Round 0 is the
initial prompt. The run folder gets rounds.json / rounds.csv / accuracy.png / checkpoint.json, soft_prompt.pt
(the product: the head is dropped) and summary.json.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedprompt.fl.rapt.records import SOFT_PROMPT
from fedprompt.fl.records import arrays_to_prompt, prompt_to_arrays


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
    from fedprompt.fl.config import method_config
    from fedprompt.fl.data import eval_examples, load_task_and_spec, reference_examples
    from fedprompt.fl.protocol import measure_references, provenance
    from fedprompt.fl.rapt.strategy import RAPTStrategy
    from fedprompt.fl.records import audit_path
    from fedprompt.fl.report import RunReport
    from fedprompt.fl.rounds import Federation, RoundDriver, Scored
    from fedprompt.fl.run import run_folder
    from fedprompt.methods.rapt import RAPTTrainer
    from fedprompt.methods.rapt.user import RAPTUser
    from fedprompt.models import SoftPrompt, load_causal_lm, load_tokenizer
    from fedprompt.privacy.dchi import load_privatizer

    fed, method, federation = cfg.federation, method_config(cfg), Federation.from_cfg(cfg)
    folder = run_folder(cfg)
    task, spec = load_task_and_spec(cfg)
    tokenizer = load_tokenizer(str(cfg.model.name))
    model = load_causal_lm(str(cfg.model.name), cfg.model.get("device"), cfg.model.get("dtype"))
    privatizer, _ = load_privatizer(method.privatize, str(cfg.model.name))
    trainer = RAPTTrainer(model, tokenizer, spec, method, seed=int(cfg.seed))
    # The evaluation queries, privatized as users would send them (the server reads only this split).
    examples = eval_examples(cfg, task)

    user = RAPTUser(method, tokenizer, privatizer)
    queries = user.privatize(examples, int(cfg.seed) + 7)[0]
    strategy = RAPTStrategy(trainer, seed=int(cfg.seed), audit_path=audit_path(cfg, folder), **federation.fedavg_kwargs())
    report = RunReport(folder, {
        "method": method.name, "task": spec.name, "model": str(cfg.model.name), "num_clients": int(fed.num_clients),
        "partition": dict(cfg.partition), "eval_split": str(fed.eval_split), "eval_n": len(queries),
        "manual_prompt": spec.manual_prompt, "eta": method.privatize.eta, **provenance(cfg),
        "expected_noise_norm": privatizer.expected_noise_norm(), "reconstruction": method.reconstruction.enabled,
        "plain_tokens": method.plain_tokens, "prompt_tokens": method.prompt.num_tokens,
        "steps_per_round": method.train.steps,
    })
    # resume=true: the report so far is restored here; the trainer's state (pool, head, optimizer) when it starts
    driver = RoundDriver(cfg, folder, report, strategy, examples)
    if fed.eval_references:  # the untuned prompts on the same privatized queries (validation: privatized alike)
        validation = reference_examples(cfg, task)
        private = {id(examples): queries}
        if validation is not examples:
            private[id(validation)] = user.privatize(validation, int(cfg.seed) + 8)[0]
        measure_references(report, lambda rows, text: trainer.predict(private[id(rows)], untuned=text), spec, examples,
                           validation)
    prompt = SoftPrompt(method.prompt.num_tokens, trainer.soft_prompt.weight.shape[1]).to(trainer.device)
    shapes = {SOFT_PROMPT: tuple(prompt.weight.shape)}

    def score(server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        if not due:
            return Scored()
        with torch.no_grad():
            prompt.weight.copy_(torch.from_numpy(arrays_to_prompt(arrays, shapes)[SOFT_PROMPT]))
        return Scored(predictions=trainer.predict(queries, prompt))

    result = driver.run(grid, prompt_to_arrays({SOFT_PROMPT: trainer.soft_prompt.weight}), score)
    torch.save(torch.from_numpy(arrays_to_prompt(result.arrays, shapes)[SOFT_PROMPT]), folder / "soft_prompt.pt")
    return report.finish(examples_received=len(trainer.examples), train_steps=trainer.steps_done,
                         soft_prompt=str(folder / "soft_prompt.pt"))
