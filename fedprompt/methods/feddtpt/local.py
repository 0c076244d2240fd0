"""One FedDTPT client's side, without Flower: its data privatized once (``method.privatize``), and its round
(the start prompt, the search against the black box with the round's seeds). The Flower client
(``fedprompt.fl.feddtpt``) decodes the global prompt, calls :meth:`LocalSearch.round` and encodes the
result; the seeds it passes come from the run's one seed formula (``fedprompt.fl.client.round_seed``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from fedprompt.blackbox import BlackBoxLM
    from fedprompt.data import Example, TaskSpec
    from fedprompt.methods.feddtpt.config import FedDTPTConfig
    from fedprompt.methods.feddtpt.search import PromptSearch, SearchResult


def privatize_partitions(partitions: Sequence[Sequence[Example]], privatizer, tokenizer,
                         seed_of: Callable[[int], int]) -> list[list[Example]]:
    """Every partition's text privatized (d_chi), partition ``i`` with seed ``seed_of(i)``; an empty partition
    (one this node lacks) stays empty. The public pool is public and is not passed here."""
    return [privatizer.privatize_examples(examples, tokenizer, seed=seed_of(i)) if examples else []
            for i, examples in enumerate(partitions)]


class LocalSearch:
    """A FedDTPT client's round: ``round(...)`` searches from the global prompt (in round 1 with seed style
    "mixed": from the client's own start) on its partition plus the public pool."""

    def __init__(self, method: FedDTPTConfig, search: PromptSearch, blackbox: BlackBoxLM) -> None:
        self.method, self.search, self.blackbox = method, search, blackbox

    def start_prompt(self, spec: TaskSpec, prompt: list[str], server_round: int, partition_id: int) -> list[str]:
        """The prompt the round's search starts from: the global one, or in round 1 with style "mixed" the client's own."""
        if server_round == 1 and self.method.seed_prompt.style == "mixed":
            return self.method.initial_prompt(spec, partition_id)  # each client starts from its own style
        return prompt

    def round(self, spec: TaskSpec, prompt: list[str], local: Sequence[Example], public: Sequence[Example], *,
              server_round: int, partition_id: int, seed: int, run_seed: int) -> SearchResult:
        """One client's search in round ``server_round``; ``seed``: the (run, round, partition) seed."""
        search = self.method.search
        return self.search.run(
            self.blackbox, spec, self.start_prompt(spec, prompt, server_round, partition_id), local, public, seed=seed,
            # public_shared: the round's public batch is the same for every client (seeded without the partition)
            public_seed=(run_seed, server_round) if search.public_shared else None,
            # shared_edits: every client of the round tries the same edits in the same order (see PromptSearch.run)
            edit_seed=(run_seed, server_round, 1) if search.shared_edits else None,
        )
