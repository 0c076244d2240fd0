"""FedDTPT's optional server check (``method.aggregate.server_check``, off in the paper): the merged prompt
is kept only if it scores at least as well as the round's starting prompt on the public pool. Plain Python;
the Flower strategy (``fedprompt.fl.feddtpt``) calls it and checkpoints its ``scores``."""

from __future__ import annotations

from fedprompt.blackbox.scoring import score_prompt


class PublicCheck:
    """``method.aggregate.server_check``: ``check(old, merged)`` keeps the merged prompt if it scores at least as
    well as the prompt the round started from on the public pool (public data: no client's text; 2 x its size
    queries a round at most). Every prompt's score is cached in ``scores`` (the old prompt was scored in the
    round before), which the strategy checkpoints: a resumed run asks the black box what the uninterrupted one
    asks, no more."""

    def __init__(self, blackbox, spec, public) -> None:
        self.blackbox, self.spec, self.public = blackbox, spec, public
        self.scores: dict[str, float] = {}  # " ".join(prompt) -> its accuracy on the public pool

    def score(self, words: list[str]) -> float:
        key = " ".join(words)
        if key not in self.scores:
            self.scores[key] = score_prompt(self.blackbox, self.spec, self.public, words)[0]
        return self.scores[key]

    def __call__(self, old: list[str], merged: list[str]) -> dict:
        before, after = self.score(old), self.score(merged)
        return {"kept": after >= before, "old_accuracy": before, "new_accuracy": after, "examples": len(self.public)}


def public_check(blackbox, spec, public) -> PublicCheck:
    """The server check on the public pool ``public`` (:class:`PublicCheck`)."""
    return PublicCheck(blackbox, spec, public)
