"""Autoencoder edits for nnsight users who write their own interventions.

Inside an nnsight trace (``with lm.trace(...)`` / ``with lm.generate(...)``) a module's envoy
(``lm.model.layers[1]``) exposes the live activation as ``.output`` (or ``.input``). These helpers read
that activation, encode it with a :class:`~saehook.sae.TopKSAE` and, for the editing ones, write the
edited activation back through the envoy, with exactly the math of :mod:`saehook.edits` (the same
:class:`~saehook.edits.Edit` objects the hooks of :func:`saehook.attach` apply):

- :func:`encode` / :func:`reconstruct`: the code / the reconstruction ``x_hat`` of the activation.
- :func:`splice`: ``x <- x_hat`` (``keep_error=True``: ``x_hat + (x - x_hat).detach()``, numerically ``x``
  with gradients reaching the autoencoder, as in attribution patching).
- :func:`steer`: ``x <- x + sum_j v_j W_dec[j] / s`` (``mode="clamp"``: latent ``j`` set to ``v_j``).
- :func:`ablate`: ``x <- x - sum_j z_j W_dec[j] / s``.

A module output may be a bare tensor (decoder layers in transformers 5) or a tuple whose first
element is the activation (attention modules, older decoder layers); both are handled, the rest of
a tuple passes through unchanged. Each editing helper returns the :class:`~saehook.sae.Codes` of the
activation *before* the edit. Like every value computed in a trace body, keep what you need past
the block with ``.save()`` / ``nnsight.save``.

Every helper acts on one forward pass: in ``lm.generate`` wrap it in ``for _ in tracer.iter[:n]`` to
act on each of ``n`` steps. To restrict an edit to some positions, use :func:`saehook.attach` instead:
its ``positions=`` are each token's index among its row's real tokens, the KV cache included (left
padding, ``generate`` with or without the cache, chunked prefill; see :data:`saehook.edits.Positions`
and ``docs/hooks.md``).

This module never imports nnsight: anything that is not a tensor, tuple or list is taken to be an
envoy and read through its ``.output`` / ``.input`` attribute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .edits import Edit, latent_ids
from .sae import Codes, TopKSAE

__all__ = ["ablate", "encode", "reconstruct", "splice", "steer"]

SITES = ("output", "input")
_KEY = "envoy"  # the key the Edit objects below are built for


def _is_value(obj) -> bool:
    return isinstance(obj, (Tensor, tuple, list))


def _read(target, site: str):
    """The value at ``target``: ``target`` itself if it is a tensor/tuple, else ``target.<site>``."""
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    return target if _is_value(target) else getattr(target, site)


def _first(value) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple whose first element is a tensor, got {type(value).__name__}"
                    + (f" of {[type(v).__name__ for v in value]}" if isinstance(value, (tuple, list)) else ""))


def _replace_first(value, y: Tensor):
    if isinstance(value, Tensor):
        return y
    return [y, *value[1:]] if isinstance(value, list) else (y, *value[1:])


def _prepare(sae: TopKSAE, x: Tensor) -> Tensor:
    if not isinstance(sae, TopKSAE):
        raise TypeError(f"expected a TopKSAE, got {type(sae).__name__}")
    if x.shape[-1] != sae.d_in:
        raise ValueError(f"autoencoder has d_in={sae.d_in}, but the activation has width {x.shape[-1]} "
                         f"(shape {tuple(x.shape)})")
    if sae.W_enc.device != x.device:
        sae.to(x.device)  # as attach does: the autoencoder follows the activation
    return x.to(sae.W_enc.dtype)


def encode(sae: TopKSAE, target, *, site: str = "output", k: int | None = None) -> Codes:
    """The autoencoder's code of an activation.

    ``target`` is an envoy (its ``.output``, or ``.input`` with ``site="input"``, is read), a module
    output (a tensor or a tuple whose first element is the activation) or an activation tensor.
    """
    x = _first(_read(target, site))
    return sae.encode(_prepare(sae, x), k=k)


def reconstruct(sae: TopKSAE, target, *, site: str = "output") -> Tensor:
    """``x_hat``, the reconstruction of the activation at ``target`` (see :func:`encode`), in the
    activation's dtype."""
    x = _first(_read(target, site))
    return sae.decode(sae.encode(_prepare(sae, x))).to(x.dtype)


def _apply(sae: TopKSAE, envoy, edit: Edit, site: str) -> Codes:
    if _is_value(envoy):
        raise TypeError("editing needs the envoy itself (e.g. lm.model.layers[1]), not its output value")
    value = _read(envoy, site)
    x = _first(value)
    xs = _prepare(sae, x)
    codes = sae.encode(xs)
    x_hat = sae.decode(codes) if edit.kind == "splice" else None
    y = edit.apply(_KEY, sae, xs, xs, codes, x_hat).to(x.dtype)
    setattr(envoy, site, _replace_first(value, y))
    return codes


def _targets(sae: TopKSAE, idx: list, vals: list, what: str) -> dict:
    idx = latent_ids(idx, sae.n_latents, what)
    dev = sae.W_dec.device
    return {_KEY: (torch.tensor(idx, dtype=torch.long, device=dev),
                   torch.tensor(vals, dtype=sae.W_dec.dtype, device=dev))}


def splice(sae: TopKSAE, envoy, *, keep_error: bool = False, site: str = "output") -> Codes:
    """Replace the activation at ``envoy`` by its reconstruction ``x_hat``. With ``keep_error=True``
    write ``x_hat + (x - x_hat).detach()``: numerically the clean activation, while a loss computed later
    in the trace (``loss.backward()`` inside the body) reaches the autoencoder through ``x_hat``; the error
    term is a constant, as in attribution patching (see :mod:`saehook.edits`)."""
    return _apply(sae, envoy, Edit("splice", {_KEY: None}, keep_error), site)


def steer(sae: TopKSAE, envoy, latents: Mapping[int, float], *, mode: str = "add",
          site: str = "output") -> Codes:
    """``{latent: value}``. ``mode="add"``: add ``value * W_dec[latent] / s`` at every position;
    ``mode="clamp"``: set the latent to ``value`` (error term kept)."""
    if mode not in ("add", "clamp"):
        raise ValueError(f"mode must be 'add' or 'clamp', got {mode!r}")
    if not isinstance(latents, Mapping):
        raise TypeError(f"steer: expected {{latent: value}}, got {latents!r}")
    targets = _targets(sae, list(latents), [float(v) for v in latents.values()], "steer")
    return _apply(sae, envoy, Edit(mode, targets), site)


def ablate(sae: TopKSAE, envoy, latents: Sequence[int] | int, *, site: str = "output") -> Codes:
    """Zero these latents, error term kept, so only their share of the activation is removed. ``latents``:
    one id or a sequence / 1-d tensor of ids, each an int, a NumPy integer or a 0-d integer tensor."""
    idx = latent_ids(latents, sae.n_latents, "ablate")
    return _apply(sae, envoy, Edit("ablate", _targets(sae, idx, [0.0] * len(idx), "ablate")), site)
