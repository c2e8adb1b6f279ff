"""What one forward pass is: where the model computes, and the token positions of its rows.

:class:`Hooked` reads every forward's inputs at the module that owns the decoder layers (the
*backbone*, e.g. ``LlamaModel``) and turns them into a :class:`ForwardState`: the same numbers however
the model is called (a plain call with or without ``position_ids``, left or right padding, a KV cache,
``generate`` with or without the cache, chunked prefill, beam search), on every architecture, because
they come from what defines them, never from the keyword arguments one architecture's layers receive:

- ``real [B, T]``: the token is not padding (``attention_mask``; all tokens without one).
- ``positions [B, T]``: the token's index among its row's real tokens, the cache included:
  ``cumsum(attention_mask) - 1`` over the cached and the new tokens (so with left padding position 0 is
  each row's first real token); the caller's ``position_ids`` when it passes them without a mask (packed
  documents); else ``past + arange(T)``.
- ``end [B]``: the row's real tokens so far (cache included).
- ``length [B]``: the row's prompt length: what negative positions count from. In a plain forward without
  a cache the prompt is the row itself (so ``-1`` is its last real token); in ``generate`` it is the
  prompt given to ``generate`` (known at the first chunk of a chunked prefill too), so an edit at ``[-1]``
  acts on the last prompt token with or without the KV cache, and never on generated tokens.
- ``fresh [B, T]``: the token was not fed before (``generate(use_cache=False)`` re-feeds the whole
  sequence at every step; only its new tokens are fresh).
- ``generated [B, T]``: the token comes after the prompt, whose length per row is learnt at the prefill
  (every forward of ``generate``'s prefill, all chunks of a chunked prefill included; a plain call without
  a cache is a prompt of its own).
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ForwardState", "Run", "StopForward", "TokenTracker", "add_position_ids", "check_runnable",
           "execution_device", "kl_divergence", "loss_mask", "model_device", "next_token_logprobs", "position_masks",
           "valid_mask"]


class StopForward(Exception):
    """Raised inside the model once every hookpoint has been read: the rest of the pass is skipped."""


# ---------------------------------------------------------------------------------------------- devices
def _hook_device(hook):
    """``execution_device`` of an accelerate hook, looking inside a ``SequentialHook``'s ``hooks``."""
    dev = getattr(hook, "execution_device", None)
    if dev is None:
        for h in getattr(hook, "hooks", ()):
            dev = _hook_device(h)
            if dev is not None:
                break
    return dev


def execution_device(model: nn.Module, name: str) -> torch.device | None:
    """Where a module computes: accelerate's execution device if it, a parent or (``cpu_offload``
    hooks only the modules that own parameters) a child has one, else the device of its first real
    parameter."""
    parts = name.split(".") if name else []
    module = model.get_submodule(name)
    mods = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts), -1, -1)] + list(module.modules())
    for mod in mods:
        dev = _hook_device(getattr(mod, "_hf_hook", None))
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for t in list(module.parameters()) + list(model.parameters()):
        if t.device.type != "meta":
            return t.device
    return None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its execution device (accelerate's, else its parameters'), else CPU."""
    return execution_device(model, "") or torch.device("cpu")


# ---------------------------------------------------------------------------------------------- masks of a batch
def position_masks(batch: dict, skip_positions: int) -> tuple[Tensor, Tensor]:
    """``(evaluated [B, T], real [B, T])`` bool masks of a batch of model inputs: real = not padding
    (``attention_mask``); evaluated = real and at least ``skip_positions`` real tokens into the row (left
    padding counts from the first real token), exactly :func:`valid_mask` of the forward over it."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device).bool()
    return valid_mask(real, real.long().cumsum(-1) - 1, None, skip_positions), real


def add_position_ids(batch: dict, real: Tensor) -> None:
    """With padding and no ``position_ids`` in ``batch``, add them counted from each row's first real token
    (as ``generate`` does), so left-padded rows see the same positions as unpadded ones."""
    if "attention_mask" in batch and "position_ids" not in batch and not bool(real.all()):
        batch["position_ids"] = (real.long().cumsum(-1) - 1).clamp_min(0)


def valid_mask(real: Tensor, positions: Tensor, fresh: Tensor | None, skip_positions: int) -> Tensor:
    """The rows to train on or measure: real, fresh, and at least ``skip_positions`` into their row."""
    keep = real & (positions >= skip_positions)
    return keep if fresh is None else keep & fresh


def loss_mask(evaluated: Tensor, real: Tensor) -> Tensor:
    """``[B, T-1]``: the prediction at ``t`` of token ``t+1`` counts if ``t`` is evaluated and ``t+1`` real."""
    return evaluated[:, :-1] & real[:, 1:]


def next_token_logprobs(logits: Tensor, ids: Tensor, lmask: Tensor) -> tuple[Tensor, Tensor]:
    """``(log-probs [n, V], cross-entropy [n])`` in float32 at the ``n`` positions of ``lmask [B, T-1]``."""
    logp = F.log_softmax(logits[:, :-1][lmask].float(), dim=-1)
    ce = -logp.gather(-1, ids[:, 1:][lmask].unsqueeze(-1)).squeeze(-1)
    return logp, ce


def kl_divergence(logp_p: Tensor, logp_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row, ``sum_v p_v (log p_v - log q_v)``, from log-probabilities ``[n, V]``."""
    return (logp_p.exp() * (logp_p - logp_q)).sum(-1)


# ---------------------------------------------------------------------------------------------- one forward
class Run(NamedTuple):
    """One forward of :meth:`saehook.Hooked.run`."""

    batch: dict
    """The model inputs as run: on the model's device, ``position_ids`` added for padding."""
    acts: dict
    """key -> activation ``[B, T, d]`` at the hookpoint (empty with ``encode`` or ``visit``)."""
    codes: dict
    """key -> :class:`Codes` ``[B, T, k]`` of the activation (``encode=True``)."""
    valid: Tensor
    """``[B, T]`` bool: real tokens at least ``skip_positions`` into their row (train / measure these)."""
    real: Tensor
    """``[B, T]`` bool: not padding."""
    positions: Tensor
    """``[B, T]`` long: each token's position in its row (see :mod:`saehook.forward`)."""
    output: object
    """The model's output when the forward ran to the end (``stop_early=False``), else None."""


@dataclass
class ForwardState:
    """The token positions of one forward through the backbone (see the module docstring)."""

    positions: Tensor
    """``[B, T]`` long."""
    real: Tensor
    """``[B, T]`` bool."""
    length: Tensor
    """``[B]`` long: the row's prompt length, what negative positions count from."""
    end: Tensor
    """``[B]`` long: the row's length so far (cache included)."""
    fresh: Tensor
    """``[B, T]`` bool."""
    generated: Tensor
    """``[B, T]`` bool."""
    phase: str
    """``"prefill"`` (prompt tokens) or ``"decode"``."""
    tapped: set = field(default_factory=set)
    """Keys whose activation the taps have seen (a re-run, e.g. activation checkpointing, is not re-fed)."""

    def cols(self, x: Tensor) -> ForwardState | None:
        """This state cut to an activation ``x [B, T', d]`` of the same forward: all of it when ``T' == T``,
        the last ``T'`` tokens when fewer (``lm_head`` under ``logits_to_keep``), else None."""
        if x.dim() < 3 or x.shape[0] != self.positions.shape[0] or x.shape[1] > self.positions.shape[1]:
            return None
        if x.shape[1] == self.positions.shape[1]:
            return self
        t = x.shape[1]
        return ForwardState(self.positions[:, -t:], self.real[:, -t:], self.length, self.end, self.fresh[:, -t:],
                            self.generated[:, -t:], self.phase, self.tapped)


def fallback_state(x: Tensor) -> ForwardState:
    """Positions ``0..T-1`` of an activation met outside any backbone forward (a module called alone)."""
    T = x.shape[-2] if x.dim() >= 2 else 1
    B = x.shape[0] if x.dim() >= 3 else 1
    pos = torch.arange(T, device=x.device).expand(B, T)
    ones = torch.ones(B, T, dtype=torch.bool, device=x.device)
    n = torch.full((B,), T, device=x.device)
    return ForwardState(pos, ones, n, n, ones, ~ones, "prefill")


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return int(get())
    try:  # legacy tuples: ((k [B, h, past, d], v), ...)
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


_HAS_PREFILL: bool | None = None


def _generation_phase() -> tuple[str | None, Tensor | None]:
    """``("prefill", prompt_len [B] or None)`` inside ``generate``'s prefill (every chunk of a chunked
    prefill; the length of each row's whole prompt, read from the prefill's own arguments),
    ``("decode", None)`` in a later step of ``generate``, ``(None, None)`` outside ``generate``. Read from
    the call stack: a forward cannot tell the last chunk of a chunked prefill from a decoding step, nor
    know the whole prompt at its first chunk, by its inputs alone."""
    global _HAS_PREFILL
    if _HAS_PREFILL is None:
        gen = sys.modules.get("transformers.generation.utils")
        _HAS_PREFILL = gen is not None and hasattr(getattr(gen, "GenerationMixin", None), "_prefill")
    if not _HAS_PREFILL:  # older transformers: the prefill is told by an empty cache
        return None, None
    f = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if "generation" in code.co_filename and "transformers" in code.co_filename:
            if code.co_name == "_prefill":
                loc = f.f_locals
                ids, mask = loc.get("input_ids"), loc.get("attention_mask")
                if mask is None:
                    mask = (loc.get("model_kwargs") or {}).get("attention_mask")
                if isinstance(mask, Tensor) and mask.dim() == 2:
                    return "prefill", mask.bool().sum(-1)
                if isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[1] > 0:  # (empty with inputs_embeds)
                    return "prefill", torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
                return "prefill", None
            if code.co_name == "generate":
                return "decode", None
        f = f.f_back
    return None, None


@functools.lru_cache(maxsize=64)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The backbone's forward arguments by name (positional ones included), bound to its class's own
    ``forward`` (a wrapper such as nnsight's may have replaced the instance's)."""
    if not args:
        return kwargs
    try:
        sig = _signature(type(module))
        out: dict = {}
        for k, v in sig.bind_partial(module, *args, **kwargs).arguments.items():
            if sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(v)
            elif sig.parameters[k].kind is not inspect.Parameter.VAR_POSITIONAL and k != "self":
                out[k] = v
        return out
    except (TypeError, ValueError):
        first = args[0]  # the usual first parameter: input_ids [B, T] (or embeddings [B, T, d])
        name = "inputs_embeds" if isinstance(first, Tensor) and first.is_floating_point() else "input_ids"
        return {name: first, **kwargs}


def read_forward(module: nn.Module, args: tuple, kwargs: dict, prev: ForwardState | None,
                 prompt_len: Tensor | None) -> tuple[ForwardState | None, Tensor | None]:
    """The :class:`ForwardState` of a forward whose backbone receives ``args`` / ``kwargs``, and the
    per-row prompt length to remember (learnt at a prefill); ``(None, prompt_len)`` when its inputs say
    nothing about the tokens (no ``input_ids`` / ``inputs_embeds`` of shape ``[B, T, ...]``)."""
    kw = _bound(module, args, kwargs)
    ids = kw.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        emb = kw.get("inputs_embeds")
        if not isinstance(emb, Tensor) or emb.dim() != 3:
            return None, prompt_len
        ids = emb[..., 0]
    B, T = ids.shape
    dev = ids.device
    cache = kw.get("cache", kw.get("past_key_values"))
    mask = kw.get("attention_mask")
    mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= T else None
    past = mask.shape[1] - T if mask is not None and mask.shape[1] > T else _cache_length(cache)
    pos_ids = kw.get("position_ids")
    if isinstance(pos_ids, Tensor) and pos_ids.dim() == 3:  # [3, B, T] multimodal rotary: the text axis
        pos_ids = pos_ids[0]
    if isinstance(pos_ids, Tensor) and (pos_ids.dim() != 2 or pos_ids.shape[-1] != T):
        pos_ids = None
    if mask is not None:
        m = mask.to(dev).bool()
        full = m.long().cumsum(-1) - 1  # [B, past + T] (or [B, T] when only the new tokens' mask is given)
        real = m[:, -T:]
        offset = past if mask.shape[1] == T else 0
        positions = full[:, -T:] + offset
        end = full[:, -1] + 1 + offset
    elif pos_ids is not None:
        positions = pos_ids.to(dev).long().expand(B, T)
        real = torch.ones(B, T, dtype=torch.bool, device=dev)
        end = positions.max(-1).values + 1
    else:
        positions = (past + torch.arange(T, device=dev)).expand(B, T)
        real = torch.ones(B, T, dtype=torch.bool, device=dev)
        end = torch.full((B,), past + T, device=dev)
    phase, whole_prompt = _generation_phase()
    if phase is None:
        phase = "prefill" if past == 0 else "decode"
    fresh = torch.ones(B, T, dtype=torch.bool, device=dev)
    if phase == "decode" and past == 0 and prev is not None and prev.end.shape[0] == B:
        fresh = positions >= prev.end.to(dev).unsqueeze(-1)  # generate without a cache re-feeds the sequence
    if phase == "prefill":
        ok = whole_prompt is not None and whole_prompt.shape[0] == B
        prompt_len = whole_prompt.to(dev) if ok else end.clone()
    if prompt_len is None or prompt_len.shape[0] != B:  # a batch of another size: no prompt known for its rows
        prompt_len = end.clone() if prompt_len is None else prompt_len.max().expand(B)
    generated = (positions >= prompt_len.to(dev).unsqueeze(-1)) & real
    length = prompt_len.to(dev)
    return ForwardState(positions, real, length, end, fresh, generated, phase), prompt_len


# ---------------------------------------------------------------------------------------------- the tracker
class TokenTracker:
    """The :class:`ForwardState` of each forward through one model, kept by four torch hooks: a pre-hook on
    the model and one on its backbone (the module owning the decoder layers) read the inputs; forward hooks on
    both report which hookpoints the forward reached (``reached``, filled by the hookpoints) to ``on_end``.
    """

    def __init__(self, on_end: Callable[[set, str | None, str], None]):
        self.on_end = on_end
        """``on_end(reached, inside, what)`` after a forward: ``inside`` is the backbone's path after a forward of
        the backbone, None after one of the whole model; ``what`` the module's class name."""
        self.current: ForwardState | None = None
        """The current (or last) forward's state."""
        self.prompt_len: Tensor | None = None
        """Per row, learnt at the last prefill."""
        self.reached: set = set()
        """Keys whose hookpoint ran during the current call."""
        self.backbone = ""
        """Path of the module that owns the decoder layers (set by :meth:`register`)."""

    def register(self, model: nn.Module, layers_name: str) -> list:
        """Register the hooks on ``model`` and on the parent of its decoder layers; returns their handles."""
        self.backbone = layers_name.rpartition(".")[0]
        bb = model.get_submodule(self.backbone)
        return [model.register_forward_pre_hook(self._begin_call),
                bb.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
                bb.register_forward_hook(lambda m, a, o: self.on_end(self.reached, self.backbone, type(m).__name__)),
                model.register_forward_hook(lambda m, a, o: self.on_end(self.reached, None, type(m).__name__))]

    def _begin_call(self, module, args):
        self.reached = set()

    def _begin_forward(self, module, args, kwargs):
        self.current, self.prompt_len = read_forward(module, args, kwargs, self.current, self.prompt_len)
        self.reached = set()

    def state(self, x: Tensor) -> ForwardState:
        """The current forward's state cut to the activation ``x [B, T', d]`` (``0..T'-1`` when ``x`` belongs to
        no forward of the backbone, e.g. a module called alone)."""
        st = self.current.cols(x) if self.current is not None else None
        return st if st is not None else fallback_state(x)


def check_runnable(model: nn.Module) -> None:
    """Refuse (or warn about) a model whose forwards would not run the hooks about to be registered."""
    params = list(model.parameters())
    if params and all(p.device.type == "meta" for p in params) and not any(
            getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        raise ValueError(f"every weight of this {type(model).__name__} is on the meta device and nothing loads "
                         "them at run time: its forwards would run another model (an nnsight LanguageModel not "
                         "yet dispatched loads a new one), never these hooks. Load the weights first (nnsight: "
                         "LanguageModel(..., dispatch=True) or lm.dispatch()), then attach")
    if getattr(model, "_compiled_call_impl", None) is not None or hasattr(model, "_orig_mod"):
        warnings.warn(f"this {type(model).__name__} was compiled with torch.compile before attach: graphs "
                      "compiled before the hooks existed may run without them (steer / splice / record would do "
                      "nothing). Attach first and compile afterwards, or call torch._dynamo.reset() after attach.",
                      stacklevel=5)
