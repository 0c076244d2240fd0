"""A tokenizer's whole-word vocabulary: the words FedDTPT's proposers and BDPL's candidates are drawn from."""

from __future__ import annotations

from fedprompt.errors import ConfigError

_WORD_MARKERS = ("Ġ", "▁")  # byte-level BPE (GPT-2, Llama 3, SmolLM) and SentencePiece word starts


def whole_word_vocab(tokenizer, min_len: int = 2, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Vocabulary tokens that are whole words on their own: (words, token ids), in id order.

    A token qualifies when it starts a word (a word-start marker in BPE/SentencePiece vocabularies; no
    ``##`` in WordPiece ones) and its text is letters only, at least ``min_len`` of them. BPE ids follow
    merge order, roughly frequency, so ``limit`` keeps the most common words.
    """
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    marked = any(t and t.startswith(_WORD_MARKERS) for t in tokens)
    words, ids, seen = [], [], set()
    for idx, tok in enumerate(tokens):
        if tok is None or idx in special:
            continue
        if marked:
            if not tok.startswith(_WORD_MARKERS):
                continue
            word = tokenizer.convert_tokens_to_string([tok]).strip()
        else:
            if tok.startswith("##"):
                continue
            word = tok
        if len(word) >= min_len and word.isalpha() and word not in seen:
            seen.add(word)
            words.append(word)
            ids.append(idx)
            if limit is not None and len(words) >= limit:
                break
    if not words:
        raise ConfigError(f"the tokenizer {type(tokenizer).__name__} has no whole-word tokens of >= {min_len} letters")
    return words, ids
