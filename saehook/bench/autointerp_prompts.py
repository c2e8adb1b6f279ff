"""The autointerp prompts, verbatim, and the parsers of what comes back.

The explanation prompt is SAEBench's (``sae_bench/evals/autointerp/main.py``, ``get_generation_prompts``, with its
demonstrations). The scoring prompt is SAEBench's scoring prompt reworded for one example at a time, answered
``Yes`` or ``No`` (detection as in EleutherAI's delphi with one example shown): a yes/no answer lets a local model be
read from its next-token log-probabilities instead of parsing a list of numbers it may not write.

Messages are chat messages, ``[{"role": "system" | "user", "content": str}]``.
"""

from __future__ import annotations

import re

__all__ = ["Messages", "explanation_prompt", "scoring_prompt", "parse_explanation", "split_scoring_prompt",
           "EXPLAIN_SYSTEM", "EXPLAIN_DEMOS", "SCORE_SYSTEM"]

Messages = list[dict[str, str]]

EXPLAIN_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron activates on some particular "
    "word/words/substring/concept in a short document. The activating words in each document are indicated with "
    "<< ... >>. We will give you a list of documents on which the neuron activates, in order from most strongly "
    "activating to least strongly activating. Look at the parts of the document the neuron activates for and "
    "summarize in a single sentence what the neuron is activating on. Try not to be overly specific in your "
    "explanation. Note that some neurons will activate only on specific words or substrings, but others will "
    "activate on most/all words in a sentence provided that sentence contains some particular concept. Your "
    "explanation should cover most or all activating words (for example, don't give an explanation which is "
    "specific to a single word if all words in a sentence cause the neuron to activate). Pay attention to things "
    "like the capitalization and punctuation of the activating words or concepts, if that seems relevant. Keep the "
    "explanation as short and simple as possible, limited to 20 words or less. Omit punctuation and formatting. You "
    "should avoid giving long lists of words."
)
EXPLAIN_DEMOS = (
    " Some examples: \"This neuron activates on the word 'knows' in rhetorical questions\", and \"This neuron "
    "activates on verbs related to decision-making and preferences\", and \"This neuron activates on the substring "
    "'Ent' at the start of words\", and \"This neuron activates on text about government economic policy\"."
)
EXPLAIN_NO_DEMOS = "Your response should be in the form \"This neuron activates on...\"."

SCORE_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron activates on some particular "
    "word/words/substring/concept in a short document. You will be given a short explanation of what this neuron "
    "activates for, and then be shown one example sequence. You will have to say whether you think the neuron "
    "should activate at least once, on ANY of the words or substrings in the document. Try not to be overly "
    "specific in your interpretation of the explanation. Answer with the single word \"Yes\" or \"No\" - this is "
    "important."
)
_SCORE_USER = ("Here is the explanation: this neuron fires on {explanation}.\n\nHere is the example:\n\n{example}\n\n"
               "Does the neuron activate on this example? Answer Yes or No.")
_SCORE_RE = re.compile(r"^Here is the explanation: this neuron fires on (?P<explanation>.*)\.\n\nHere is the "
                       r"example:\n\n(?P<example>.*)\n\nDoes the neuron activate on this example\? Answer Yes or No\.$",
                       re.DOTALL)


def explanation_prompt(examples: list[str], demos: bool = True) -> Messages:
    """SAEBench's explanation prompt over ``examples`` (texts with activating tokens marked ``<<tok>>``, strongest
    first), numbered from 1. Raises ``ValueError`` for no examples."""
    if not examples:
        raise ValueError("an explanation prompt needs at least one activating example")
    listed = "\n".join(f"{i + 1}. {text}" for i, text in enumerate(examples))
    system = EXPLAIN_SYSTEM + (EXPLAIN_DEMOS if demos else EXPLAIN_NO_DEMOS)
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"The activating documents are given below:\n\n{listed}"}]


def scoring_prompt(explanation: str, example: str) -> Messages:
    """The yes/no detection prompt for one unmarked ``example`` text under ``explanation``."""
    return [{"role": "system", "content": SCORE_SYSTEM},
            {"role": "user", "content": _SCORE_USER.format(explanation=explanation, example=example)}]


def split_scoring_prompt(messages: Messages) -> tuple[str, str]:
    """``(explanation, example)`` back from a :func:`scoring_prompt`. Raises ``ValueError`` for other messages."""
    m = _SCORE_RE.match(messages[-1]["content"]) if messages else None
    if m is None:
        raise ValueError("these messages are not a saehook autointerp scoring prompt (see scoring_prompt)")
    return m["explanation"], m["example"]


def parse_explanation(text: str) -> str:
    """SAEBench's parse (the text after the last ``"activates on"``, trailing period dropped), on the first
    non-empty line only (a small model may go on writing)."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    return line.split("activates on")[-1].strip().rstrip(".").strip()
