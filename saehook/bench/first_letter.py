"""The first-letter task of feature absorption (Chanin et al. 2024), built from the model's own vocabulary.

As SAEBench's ``sae_bench/evals/absorption`` (``vocab.py``, ``prompting.py``, ``probing.py``):

- **Words**: every token of the tokenizer's vocabulary whose text (``convert_tokens_to_string([token])``) is,
  after dropping one leading space, one or more ASCII letters ``a-z A-Z`` and nothing else. ``" cat"`` and
  ``"cat"`` are two words; the leading space stays part of the word. Labelled by the first letter, lower-cased
  (26 classes).
- **Prompts**: ``template = "{word} has the first letter:"``, answer ``" " + first letter upper-cased``; ten
  in-context examples drawn at random from the word's own split (never the word itself), each
  ``template.format(word=ex) + answer``, joined by ``"\\n"``, with a ``"\\n"`` before the first example and
  between the last example and the word's own (unanswered) line::

      "\\n cat has the first letter: C\\n dog has the first letter: D ... \\n sun has the first letter:"

- **Position**: the activation is read at the word's token, ``prompt_token_pos = -6`` from the end (the word,
  then `` has`` `` the`` `` first`` `` letter`` ``:``). A word whose prompt does not tokenize with the word as
  that single token is dropped (SAEBench reads position -6 regardless); the number dropped is reported.
- **Split**: the words are shuffled with the seed and split 80% train / 20% test.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ALPHA = frozenset(LETTERS + LETTERS.upper())

__all__ = ["LETTERS", "FirstLetterTask", "alpha_words", "first_letter", "icl_prompt", "first_letter_task"]


def first_letter(word: str) -> int:
    """The class ``0..25`` of ``word``'s first letter (after leading spaces), case-insensitive."""
    return LETTERS.index(word.strip()[0].lower())


def alpha_words(tokenizer) -> list[str]:
    """SAEBench's vocabulary (``get_alpha_tokens``): the text of every token that is ASCII letters only, after at
    most one leading space, in vocabulary-id order (SAEBench iterates the vocab dict; ids make it reproducible)."""
    vocab = tokenizer.get_vocab()
    words = []
    for token in sorted(vocab, key=vocab.__getitem__):
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("\u2581") and not text.startswith(" "):  # SAEBench's fix for sentencepiece's "▁"
            text = " " + text
        bare = text[1:] if text.startswith(" ") else text
        if bare and all(c in _ALPHA for c in bare):
            words.append(text)
    return words


def icl_prompt(word: str, examples: Sequence[str], rng: random.Random, *,
               template: str = "{word} has the first letter:", max_icl_examples: int = 10) -> str:
    """SAEBench's ``create_icl_prompt`` (shuffled, contamination-checked, separator ``"\\n"`` also before the first
    example): the prompt text for ``word``, ending with its unanswered line. Raises ``ValueError`` when fewer than
    ``max_icl_examples`` examples other than ``word`` exist."""
    n = min(max_icl_examples, len(examples))
    for _ in range(1000):
        chosen = rng.sample(list(examples), n)
        if word not in chosen:
            break
    else:
        raise ValueError(f"could not draw {n} in-context examples other than {word!r} from {len(examples)} words; "
                         f"give the task more words")
    lines = [template.format(word=ex) + " " + ex.strip()[0].upper() for ex in chosen]
    return "\n" + "\n".join(lines) + "\n" + template.format(word=word)


@dataclass(frozen=True)
class FirstLetterTask:
    """The words and their prompts, tokenized and cut right after the word (the model is causal, so the word's
    activation does not depend on what follows it).

    Attributes:
        words: the kept words, train first, then test.
        labels: ``[N]`` first-letter classes ``0..25`` (a list of ints).
        docs: token ids of each prompt up to and including the word's token (the activation is the last one).
        n_train: the first ``n_train`` entries are the train split, the rest the test split.
        n_dropped: words dropped because their prompt did not hold them as one token at ``prompt_token_pos``.
    """

    words: list[str]
    labels: list[int]
    docs: list[list[int]]
    n_train: int
    n_dropped: int


def first_letter_task(tokenizer, *, template: str = "{word} has the first letter:", prompt_token_pos: int = -6,
                      max_icl_examples: int = 10, train_fraction: float = 0.8, max_words: int | None = None,
                      seed: int = 42) -> FirstLetterTask:
    """Build the task from ``tokenizer``'s vocabulary (see the module docstring). ``max_words`` keeps a random
    subset of that many words (before the split; None keeps all). Raises ``ValueError`` when fewer than 26 words
    remain or ``prompt_token_pos`` is not negative."""
    if prompt_token_pos >= 0:
        raise ValueError(f"prompt_token_pos counts from the prompt's end and must be negative, got {prompt_token_pos}")
    rng = random.Random(seed)
    words = alpha_words(tokenizer)
    rng.shuffle(words)
    if max_words is not None:
        words = words[:max_words]
    if len(words) < 26:
        raise ValueError(f"the tokenizer has only {len(words)} single-token alphabetic words (need at least 26)")
    cut = int(len(words) * train_fraction)
    kept: list[tuple[str, list[int]]] = []
    dropped, n_train = 0, 0
    for split, start, stop in (("train", 0, cut), ("test", cut, len(words))):
        pool = words[start:stop]
        for word in pool:
            ids = tokenizer(icl_prompt(word, pool, rng, template=template, max_icl_examples=max_icl_examples)
                            )["input_ids"]
            pos = len(ids) + prompt_token_pos
            if pos < 0 or tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens([ids[pos]])).strip() \
                    != word.strip():
                dropped += 1
                continue
            kept.append((word, list(ids[:pos + 1])))
        if split == "train":
            n_train = len(kept)
    return FirstLetterTask(words=[w for w, _ in kept], labels=[first_letter(w) for w, _ in kept],
                           docs=[d for _, d in kept], n_train=n_train, n_dropped=dropped)
