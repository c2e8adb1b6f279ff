"""Language-model judges for autointerp: one small interface, three backends.

A judge has two methods:

- ``complete(messages, max_new_tokens) -> str``: the answer to chat ``messages`` (the explainer's use);
- ``yes_probabilities(prompts) -> list[float]``: for each prompt (a yes/no question), the probability the answer is
  yes. A backend with logits reads it from the next token: ``P(yes) / (P(yes) + P(no))`` over the first tokens of
  ``"Yes"``, ``" Yes"``, ``"yes"``, ``" yes"`` (and the same for no); one without (an HTTP endpoint) answers 1.0 when
  its greedy reply starts with "yes", else 0.0.

Backends: :class:`LocalLM` (any transformers causal LM, greedy, chat template when the tokenizer has one),
:class:`OpenAIChat` (an OpenAI-compatible ``/v1/chat/completions`` endpoint, through the standard library's urllib),
and :class:`KeywordJudge`, a deterministic test double used only in tests.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import urllib.error
import urllib.request
from collections import Counter
from typing import Protocol

import torch

from .autointerp_prompts import Messages, split_scoring_prompt

__all__ = ["Judge", "LocalLM", "OpenAIChat", "KeywordJudge", "parse_yes"]

YES_WORDS = ("Yes", " Yes", "yes", " yes")
NO_WORDS = ("No", " No", "no", " no")


class Judge(Protocol):
    """What autointerp needs of a language model (explainer and scorer)."""

    name: str
    """What answers, for the results' config (e.g. ``"local:HuggingFaceTB/SmolLM2-135M-Instruct"``)."""

    def complete(self, messages: Messages, max_new_tokens: int) -> str:
        """The answer to chat ``messages``, at most ``max_new_tokens`` tokens, deterministic."""
        ...

    def yes_probabilities(self, prompts: list[Messages]) -> list[float]:
        """For each yes/no question in ``prompts``, the probability in [0, 1] that the answer is yes."""
        ...


def parse_yes(text: str) -> float:
    """1.0 when ``text`` starts with "yes" (any case, after quotes, asterisks and spaces), else 0.0."""
    return 1.0 if text.strip().lstrip("\"'*` ").lower().startswith("yes") else 0.0


class LocalLM:
    """A transformers causal LM as judge: greedy generation, ``torch.manual_seed(seed)`` before each call, prompts
    through the tokenizer's chat template (or, without one, ``system + "\\n\\n" + user + "\\n\\nAnswer:"``).

    Args:
        model: a causal LM (eval mode); its device is used.
        tokenizer: its tokenizer.
        seed: set before every generation (greedy decoding needs none; a model with sampling defaults does).
        batch_size: prompts per forward in :meth:`yes_probabilities` (right-padded).
        prefix_cache: run the prompts' common prefix once and share its key/value cache (the same numbers to
            float rounding, about 3x faster for autointerp's scoring prompts); False: whole prompts.
    Raises ``ValueError`` if the tokenizer has no token for either of yes or no.
    """

    def __init__(self, model, tokenizer, *, seed: int = 0, batch_size: int = 8, prefix_cache: bool = True):
        self.model, self.tokenizer, self.seed, self.batch_size = model, tokenizer, seed, batch_size
        self.prefix_cache = prefix_cache
        # transformers 5 renamed forward's past_key_values to cache (the old name warns)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.name = f"local:{getattr(model.config, 'name_or_path', '') or type(model).__name__}"
        self.yes_ids, self.no_ids = self._first_ids(YES_WORDS), self._first_ids(NO_WORDS)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"the judge's tokenizer has no distinct first tokens for yes ({self.yes_ids}) and no "
                             f"({self.no_ids}); use a tokenizer whose vocabulary spells 'Yes' and 'No'")

    def _first_ids(self, words) -> list[int]:
        unk = self.tokenizer.unk_token_id
        ids = {ids[0] for w in words if (ids := self.tokenizer.encode(w, add_special_tokens=False))}
        return sorted(ids - {unk})

    def prompt_ids(self, messages: Messages) -> list[int]:
        """The token ids of ``messages``, ending where the answer starts."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
        return tok.encode(text)

    def _device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def complete(self, messages: Messages, max_new_tokens: int) -> str:
        """Greedy continuation of :meth:`prompt_ids` ``(messages)``, special tokens dropped, stripped."""
        ids = torch.tensor([self.prompt_ids(messages)], device=self._device())
        torch.manual_seed(self.seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    @torch.no_grad()
    def yes_probabilities(self, prompts: list[Messages]) -> list[float]:
        """``P(yes) / (P(yes) + P(no))`` of the next token after each prompt, ``batch_size`` prompts a forward.
        The prompts' common prefix (the system prompt) runs once and its key/value cache is shared by the batch."""
        out: list[float] = []
        for s in range(0, len(prompts), self.batch_size):
            rows = [self.prompt_ids(m) for m in prompts[s:s + self.batch_size]]
            n = _common_prefix(rows) if self.prefix_cache else 0
            n = min(n, min(map(len, rows)) - 1)  # every row keeps a token to predict from
            dev = self._device()
            cache = None
            if n >= 8:
                cache = self.model(input_ids=torch.tensor([rows[0][:n]], device=dev), use_cache=True).past_key_values
                cache.batch_repeat_interleave(len(rows))
            else:
                n = 0
            width = max(map(len, rows)) - n
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), n + width, dtype=torch.long)
            for i, r in enumerate(rows):  # right padding: a real token never attends to a pad (causal)
                ids[i, :len(r) - n], mask[i, :len(r)] = torch.tensor(r[n:]), 1
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                **({self._cache_arg: cache} if cache is not None else {})).logits  # [B, T - n, V]
            last = logits[torch.arange(len(rows)), torch.tensor([len(r) - n - 1 for r in rows])].float()
            p = last.softmax(-1).cpu()  # [B, V]
            p_yes, p_no = p[:, self.yes_ids].sum(-1), p[:, self.no_ids].sum(-1)
            out += (p_yes / (p_yes + p_no).clamp_min(1e-30)).tolist()
        return out


def _common_prefix(rows: list[list[int]]) -> int:
    n = 0
    for column in zip(*rows):
        if any(c != column[0] for c in column):
            break
        n += 1
    return n


class OpenAIChat:
    """An OpenAI-compatible chat endpoint as judge (OpenAI, vLLM, llama.cpp's server, Ollama, ...): ``POST
    {base_url}/chat/completions`` with ``temperature 0`` and ``seed``.

    Args:
        base_url: e.g. ``"http://localhost:8000/v1"``; default ``$OPENAI_BASE_URL``, else
            ``"https://api.openai.com/v1"``.
        model: the served model's name; default ``$SAEHOOK_JUDGE_MODEL``.
        api_key: sent as ``Authorization: Bearer``; default ``$OPENAI_API_KEY``; none is sent when unset.
        timeout: seconds for one request.
        seed: sent with every request (endpoints that honour it answer reproducibly).
    Raises ``ValueError`` without a model name.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, seed: int = 0):
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.model = model or os.environ.get("SAEHOOK_JUDGE_MODEL")
        if not self.model:
            raise ValueError("an OpenAI-compatible judge needs a model name: pass model= (e.g. 'gpt-4o-mini') or "
                             "set SAEHOOK_JUDGE_MODEL")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout, self.seed = timeout, seed
        self.name = f"openai:{self.model}@{self.base_url}"

    def complete(self, messages: Messages, max_new_tokens: int) -> str:
        """The first choice's message content. Raises ``ConnectionError`` (unreachable), ``TimeoutError``, or
        ``RuntimeError`` (an HTTP error status, or an answer that is not a chat completion)."""
        url = f"{self.base_url}/chat/completions"
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                           "temperature": 0, "seed": self.seed}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            raise RuntimeError(f"{url} answered HTTP {e.code} ({detail}); check the model name, the API key "
                               "(OPENAI_API_KEY) and the base URL") from None
        except (socket.timeout, TimeoutError):
            raise TimeoutError(f"{url} did not answer within {self.timeout:g} s; raise timeout= or check the "
                               "server") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise TimeoutError(f"{url} did not answer within {self.timeout:g} s; raise timeout= or check the "
                                   "server") from None
            raise ConnectionError(f"cannot reach {url} ({e.reason}); check the base URL (e.g. "
                                  "http://localhost:8000/v1) and that the server is running") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"].strip()
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RuntimeError(f"{url} did not answer with a chat completion (got {raw[:200]!r}); point base_url "
                               "at an OpenAI-compatible /v1 endpoint") from None

    def yes_probabilities(self, prompts: list[Messages]) -> list[float]:
        """1.0 or 0.0 per prompt: whether the endpoint's reply (3 tokens at most) starts with "yes"."""
        return [parse_yes(self.complete(m, 3)) for m in prompts]


class KeywordJudge:
    """A deterministic stand-in for a language model, **used only in tests** (the test double of autointerp).

    As explainer it names the token marked ``<<tok>>`` most often in the prompt: ``"This neuron activates on the
    token 'tok'."``. As scorer it says yes (1.0) iff a quoted string of the explanation (``'...'`` or ``"..."``)
    occurs in the example as a whole token (not inside a longer word), else no (0.0).
    """

    name = "keyword (test double)"

    def complete(self, messages: Messages, max_new_tokens: int) -> str:
        """Names the most often marked token of the last message (``max_new_tokens`` is ignored)."""
        marked = Counter(t.strip() for t in re.findall(r"<<(.*?)>>", messages[-1]["content"]))
        if not marked:
            return "This neuron activates on nothing."
        return f"This neuron activates on the token '{marked.most_common(1)[0][0]}'."

    def yes_probabilities(self, prompts: list[Messages]) -> list[float]:
        """1.0 where a quoted word of the explanation occurs in the example as a whole token, else 0.0."""
        out = []
        for m in prompts:
            explanation, example = split_scoring_prompt(m)
            quoted = [a or b for a, b in re.findall(r"'([^']+)'|\"([^\"]+)\"", explanation)]
            hit = any(re.search(rf"(?<!\w){re.escape(q.strip())}(?!\w)", example) for q in quoted if q.strip())
            out.append(1.0 if hit else 0.0)
        return out
