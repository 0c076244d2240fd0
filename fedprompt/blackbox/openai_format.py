"""OpenAI response bodies (legacy completions and chat completions) from engine results."""

from __future__ import annotations

import time
import uuid

from fedprompt.blackbox.engine import Completion, PromptPlan, ScoringEngine


def _top_dict(engine: ScoringEngine, pairs) -> dict[str, float] | None:
    if pairs is None:
        return None
    out: dict[str, float] = {}
    for token_id, logprob in pairs:  # two ids can decode to the same text: keep the likelier
        out.setdefault(engine.token_text(token_id), logprob)
    return out


def legacy_logprobs(engine: ScoringEngine, plan: PromptPlan, comp: Completion, echo: bool) -> dict:
    """``{tokens, token_logprobs, top_logprobs, text_offset}``; offsets index prompt + completion text."""
    tokens, logprobs, tops, offsets = [], [], [], []
    if echo:
        assert comp.prompt_logprobs is not None and comp.prompt_top is not None  # the engine fills them for echo
        for i, token_id in enumerate(plan.ids):
            tokens.append(engine.token_text(token_id))
            logprobs.append(comp.prompt_logprobs[i])
            tops.append(_top_dict(engine, comp.prompt_top[i]))
            offsets.append(plan.offsets[i][0])
    position = len(plan.text)
    for token_id, logprob, top in zip(comp.gen_ids, comp.gen_logprobs, comp.gen_top):
        text = engine.token_text(token_id)
        tokens.append(text)
        logprobs.append(logprob)
        tops.append(_top_dict(engine, top))
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(engine: ScoringEngine, plans: list[PromptPlan], comps: list[Completion], echo: bool,
                    with_logprobs: bool) -> dict:
    choices = [{
        "index": i,
        "text": (plan.text if echo else "") + comp.text,
        "logprobs": legacy_logprobs(engine, plan, comp, echo) if with_logprobs else None,
        "finish_reason": comp.finish_reason,
    } for i, (plan, comp) in enumerate(zip(plans, comps))]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": engine.model_id, "choices": choices,
            "usage": _usage(sum(len(p.ids) for p in plans), sum(len(c.gen_ids) for c in comps))}


def _chat_token(engine: ScoringEngine, token_id: int, logprob: float) -> dict:
    text = engine.token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_body(engine: ScoringEngine, plan: PromptPlan, comp: Completion, with_logprobs: bool) -> dict:
    logprobs = None
    if with_logprobs:
        logprobs = {"content": [
            {**_chat_token(engine, token_id, logprob), "top_logprobs": [_chat_token(engine, i, lp) for i, lp in top]}
            for token_id, logprob, top in zip(comp.gen_ids, comp.gen_logprobs, comp.gen_top)
        ]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": engine.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": comp.text}, "logprobs": logprobs,
                         "finish_reason": comp.finish_reason}],
            "usage": _usage(len(plan.ids), len(comp.gen_ids))}
