"""Attach TopK autoencoders to a live model: record their latents, splice, steer and ablate.

One :class:`Hooked` owns every hook it registers (torch's own ``register_forward_hook`` /
``register_forward_pre_hook``, so accelerate's placement hooks keep working) and removes them in
``finally``: leaving any context, normally or by an exception, leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .edits import Edit, Positions, check_positions, latent_ids
from .forward import (
    ForwardState,
    Run,
    StopForward,
    TokenTracker,
    add_position_ids,
    check_runnable,
    execution_device,
    fallback_state,
    model_device,
    valid_mask,
)
from .hookpoints import Hookpoint, Key, find_layers, resolve, unwrap
from .sae import Codes, TopKSAE

log = logging.getLogger(__name__)


_execution_device = execution_device  # the name older code imports from here


class _SiteHook:
    """The hook at one hookpoint: reads the activation, hands it to its owner, writes back an edit."""

    def __init__(self, owner: Hooked, hp: Hookpoint):
        self.owner, self.hp = owner, hp
        self.module_input: Tensor | None = None  # a transcoder's: the module's input, kept until its output

    def output_hook(self, module, args, kwargs, output):
        x = output if isinstance(output, Tensor) else output[0]
        x_in, self.module_input = self.module_input, None
        y = self.owner._process(self.hp, x, x_in)
        if y is None:
            return None
        return y if isinstance(output, Tensor) else (y, *output[1:])

    def _input_tensor(self, args, kwargs) -> Tensor:
        if args and isinstance(args[0], Tensor):
            return args[0]
        if isinstance(kwargs.get("hidden_states"), Tensor):
            return kwargs["hidden_states"]
        raise TypeError(f"{self.hp}: cannot find the input tensor (no positional tensor or hidden_states)")

    def input_hook(self, module, args, kwargs):
        y = self.owner._process(self.hp, self._input_tensor(args, kwargs))
        if y is None:
            return None
        if args and isinstance(args[0], Tensor):
            return (y, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": y}

    def keep_input(self, module, args, kwargs):
        """A transcoder's pre-hook: keep the module's input for the output hook."""
        self.module_input = self._input_tensor(args, kwargs)


class LatentsMissing(KeyError):
    """``hooked.latents[key]`` has nothing to give: the key is not attached, or no forward recorded it yet."""

    def __str__(self) -> str:  # KeyError would show the message's repr, quotes included
        return str(self.args[0]) if self.args else ""


class Latents(dict):
    """``key -> Codes`` of the most recent forward; a missing key says why (:class:`LatentsMissing`)."""

    def __init__(self, owner: Hooked):
        super().__init__()
        self._owner = owner

    def __missing__(self, key):
        o = self._owner
        if key not in o.saes:
            raise LatentsMissing(f"no autoencoder is attached at {key!r}; the attached keys are {list(o.saes)}")
        if not o.record:
            raise LatentsMissing(f"no latents for {key!r}: recording is off (record=False); set hooked.record = True "
                                 "and run the model")
        raise LatentsMissing(f"no latents for {key!r} yet: run the model first (e.g. model(**batch)) inside the "
                             f"attach; latents hold the codes of the most recent forward that reached {key!r}")


class Hooked:
    """Autoencoders attached to a model; see :func:`attach`.

    Attributes:
        model: the hooked ``nn.Module``.
        saes: key -> :class:`TopKSAE`, keyed by the keys the user gave.
        hookpoints: key -> :class:`~saehook.hookpoints.Hookpoint`.
        latents: key -> :class:`Codes` of the most recent forward (under a KV cache: of the new tokens); no
            entry for a hookpoint that forward did not run.
        record: whether forwards encode and store latents (set False to skip that compute).
    """

    def __init__(self, model, saes: Mapping[Key, TopKSAE], *, record: bool = True):
        self.model = unwrap(model)
        if not isinstance(saes, Mapping):
            example = "{20: sae}" if isinstance(saes, TopKSAE) else "{20: sae_a, \"model.layers.5.mlp\": sae_b}"
            raise TypeError(f"attach takes a dict {{hookpoint: TopKSAE}}, e.g. attach(model, {example}), "
                            f"not a {type(saes).__name__}: the key says where the autoencoder goes")
        if not saes:
            raise ValueError("attach needs at least one {key: TopKSAE}")
        self.hookpoints: dict[Key, Hookpoint] = {}
        self.saes: dict[Key, TopKSAE] = {}
        seen: dict[str, Key] = {}
        for key, sae in saes.items():
            if not isinstance(sae, TopKSAE):
                raise TypeError(f"the value for key {key!r} is a {type(sae).__name__}, not a TopKSAE")
            hp = resolve(self.model, key)
            if str(hp) in seen:
                raise ValueError(f"keys {seen[str(hp)]!r} and {key!r} both name hookpoint {hp}")
            seen[str(hp)] = key
            if sae.transcoder and hp.site != "output":
                raise ValueError(f"a transcoder reads a module's input and replaces its output, so it is attached at "
                                 f"the module ({hp.name!r}), not at {str(hp)!r}")
            if hp.width is not None and hp.width != sae.d_in:
                raise ValueError(f"autoencoder for {key!r} has d_in={sae.d_in}, but hookpoint {hp} has width "
                                 f"{hp.width}")
            dev = _execution_device(self.model, hp.name)
            if dev is not None and sae.W_enc.device != dev and not sae.W_enc.is_meta:
                sae.to(dev)  # moved once, here, not every forward (a meta one holds no weights: shard="latents")
            self.hookpoints[key], self.saes[key] = hp, sae
        self.latents: dict[Key, Codes] = Latents(self)
        self.record = record
        self._edits: list[Edit] = []
        self._taps: list = []  # callables (key, hookpoint, x) used by training while running
        self._replace = None  # callable (key, hookpoint, x) -> Tensor | None, see replacing()
        self._tokens = TokenTracker(self._check_edits_reached)  # positions, padding, prompt of each forward
        self._position_ids_ok: bool | None = None  # whether model.forward takes position_ids (model_inputs)
        self._handles: list = []
        self._attach()

    # ------------------------------------------------------------------ attach / detach
    def _attach(self) -> None:
        try:
            check_runnable(self.model)
            self._handles += self._tokens.register(self.model, find_layers(self.model)[0])
            for hp in self.hookpoints.values():
                site = _SiteHook(self, hp)
                if self.saes[hp.key].transcoder:  # reads the module's input, writes its output
                    self._handles.append(hp.module.register_forward_pre_hook(site.keep_input, with_kwargs=True))
                if hp.site == "output":
                    h = hp.module.register_forward_hook(site.output_hook, with_kwargs=True)
                else:
                    h = hp.module.register_forward_pre_hook(site.input_hook, with_kwargs=True)
                self._handles.append(h)
        except BaseException:
            self.detach()  # a failed attach rolls back
            raise

    def detach(self) -> None:
        """Remove every hook this object registered (idempotent). Other hooks are untouched."""
        while self._handles:
            self._handles.pop().remove()
        self._edits.clear()
        self._taps.clear()
        self._replace = None

    @property
    def attached(self) -> bool:
        """Whether the hooks are still registered (False after :meth:`detach` or leaving the ``with``)."""
        return bool(self._handles)

    def __enter__(self) -> Hooked:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ the forward's tokens
    def _state(self, x: Tensor) -> ForwardState:
        """The current forward's token state, cut to the activation ``x`` (see :mod:`saehook.forward`)."""
        return self._tokens.state(x)

    def _check_edits_reached(self, reached: set, inside: str | None, what: str) -> None:
        """After a forward of the model (``inside=None``) or of its decoder stack (``inside`` = its path):
        an active edit whose hookpoint (within ``inside``) never ran had no effect. Raise if its module is no
        longer the model's (replaced after attach), warn if the model merely skipped it this time (e.g. an
        MoE expert that got no token, an early exit). A recorded hookpoint it never ran keeps no code from an
        older forward in :attr:`latents`."""
        prefix = inside + "." if inside else ""
        for key, hp in self.hookpoints.items():
            if key not in reached and hp.name.startswith(prefix):
                self.latents.pop(key, None)  # not this forward's: never left to be read as if it were
        hps = []
        for e in self._edits:
            for key in e.targets:
                hp = self.hookpoints[key]
                if key not in reached and hp.name.startswith(prefix) and hp not in hps:
                    hps.append(hp)
        if not hps:
            return
        modules = dict(self.model.named_modules())
        replaced = [str(hp) for hp in hps if modules.get(hp.name) is not hp.module]
        if replaced:
            raise RuntimeError(
                f"an edit (splice / steer / ablate) is active on {', '.join(replaced)}, but this forward of {what} "
                "never ran the module attached there: it was replaced after attach (by peft, or by assigning a new "
                "module), so the edit had no effect and the output is not what it asks for. Attach again to the "
                "model as it runs now.")
        reached.update(hp.key for hp in hps)  # said once: the model's own check after its backbone's stays quiet
        warnings.warn(f"an edit (splice / steer / ablate) is active on {', '.join(str(hp) for hp in hps)}, but this "
                      f"forward of {what} never ran it (the model skipped the module, e.g. an expert that received no "
                      "token, or an early exit): the edit had no effect on this forward. Hook a module every forward "
                      "runs to edit every forward.", RuntimeWarning, stacklevel=4)

    def valid_mask(self, x: Tensor, skip_positions: int = 0) -> Tensor:
        """``[B, T]`` bool for an activation ``x [B, T, d]`` of the current forward: the rows to train on or
        measure. Real tokens (not padding), fed for the first time (``generate(use_cache=False)`` re-feeds
        the sequence at every step), at least ``skip_positions`` into their row (left padding counts from
        the first real token, the KV cache included)."""
        st = self._state(x)
        return valid_mask(st.real, st.positions, st.fresh, skip_positions)

    def model_inputs(self, batch) -> dict:
        """``batch`` (an ``input_ids`` tensor ``[B, T]`` / ``[T]`` or a dict for ``model(**batch)``) as the
        model's inputs: on its device, without ``labels``, and, when padded without ``position_ids``, with
        ``position_ids`` counted from each row's first real token (for models that take them), so that a
        padded row computes what it computes alone."""
        if isinstance(batch, Tensor):
            batch = {"input_ids": batch if batch.dim() == 2 else batch.unsqueeze(0)}
        if not isinstance(batch, Mapping):
            raise TypeError(f"a batch is an input_ids tensor or a dict for model(**batch), got {type(batch)}")
        device = model_device(self.model)
        out = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items() if k != "labels"}
        mask = out.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and self._takes_position_ids():
            add_position_ids(out, mask.bool())
        return out

    def _takes_position_ids(self) -> bool:
        if self._position_ids_ok is None:
            try:
                self._position_ids_ok = "position_ids" in inspect.signature(self.model.forward).parameters
            except (TypeError, ValueError):
                self._position_ids_ok = False
        return self._position_ids_ok

    def run(self, batch, *, skip_positions: int = 0, stop_early: bool = True, encode: bool = False,
            visit: Callable[[Key, Tensor, Tensor], None] | None = None) -> Run:
        """One forward over ``batch`` that reads every hookpoint: the one way through the model that
        training, evaluation, examples, probes and explanations share.

        Args:
            batch: an ``input_ids`` tensor ``[B, T]`` or a dict for ``model(**batch)``; moved to the model's
                device, ``position_ids`` added for padding (:meth:`model_inputs`).
            skip_positions: ``valid`` leaves out each row's first ``skip_positions`` real tokens (BOS).
            stop_early: stop the forward right after the deepest hookpoint has been read (no later layers,
                no ``lm_head``); ``output`` is then None.
            encode: keep each hookpoint's :class:`Codes` (``codes[key]``) instead of its activation.
            visit: ``visit(key, x [B, T, d], valid [B, T])`` at each hookpoint as it is reached, instead of
                keeping anything (streaming: one hookpoint's activation in memory at a time).

        Active edits (splice, steer, ablate) act as in any forward; activations are read before them.
        Returns a :class:`Run`. Raises ``RuntimeError`` if the forward never reached some hookpoint.
        """
        if not self.attached:
            raise RuntimeError("these autoencoders are detached; use the context inside `with attach(...)`")
        inputs = self.model_inputs(batch)
        acts: dict = {}
        codes: dict = {}
        seen: set = set()

        def tap(key, hp, x):
            if visit is not None:
                visit(key, x, self.valid_mask(x, skip_positions))
            elif encode:
                sae = self.saes[key]
                codes[key] = sae.encode(x.to(sae.W_enc.dtype))
            else:
                acts[key] = x
            seen.add(key)

        def stop(*_):  # after the hookpoint's own hook (its latents recorded, as in any forward)
            if len(seen) == len(self.saes):
                raise StopForward

        stops = [hp.module.register_forward_hook(stop) if hp.site == "output" else
                 hp.module.register_forward_pre_hook(stop) for hp in self.hookpoints.values()] if stop_early else []
        self._tokens.current = None
        output = None
        try:
            with self._tapping(tap), contextlib.suppress(StopForward):
                output = self.model(**inputs)
        finally:
            for h in stops:
                h.remove()
        missing = [str(self.hookpoints[k]) for k in self.saes if k not in seen]
        if missing:
            raise RuntimeError(f"the forward pass never reached hookpoints {missing}")
        st = self._tokens.current
        if st is None:
            ids = inputs.get("input_ids")
            st = fallback_state(ids.unsqueeze(-1)) if isinstance(ids, Tensor) else None
        real = st.real if st is not None else None
        valid = valid_mask(st.real, st.positions, st.fresh, skip_positions) if st is not None else None
        return Run(inputs, acts, codes, valid, real, st.positions if st is not None else None, output)

    # ------------------------------------------------------------------ the hot path
    def _process(self, hp: Hookpoint, x: Tensor, x_in: Tensor | None = None) -> Tensor | None:
        """The hook's work on activation ``x`` (a transcoder's: the module's output, with its input ``x_in``)."""
        key = hp.key
        self._tokens.reached.add(key)
        edits = [e for e in self._edits if key in e.targets]
        if not (self.record or edits or self._taps or self._replace):
            return None
        sae = self.saes[key]
        if x.shape[-1] != sae.d_in:
            raise ValueError(f"autoencoder for {key!r} has d_in={sae.d_in}, but hookpoint {hp} produced "
                             f"width {x.shape[-1]} (activation shape {tuple(x.shape)})")
        if x.device != sae.W_enc.device and not sae.W_enc.is_meta:  # meta: no weights to move (shard="latents")
            log.info("moving the autoencoder for %r to %s", key, x.device)
            sae.to(x.device)
        if sae.transcoder:  # taps, replacements and training see [input, output] side by side
            if x_in is None or x_in.shape[:-1] != x.shape[:-1]:
                raise RuntimeError(f"{hp}: the transcoder did not receive the module's input with its output")
            x_pair = torch.cat([x_in.to(x.dtype), x], -1)
        else:
            x_pair = x
        fwd = self._tokens.current
        if self._taps and (fwd is None or key not in fwd.tapped):  # a re-run (checkpointing) is not re-fed
            if fwd is not None:
                fwd.tapped.add(key)
            for tap in list(self._taps):
                tap(key, hp, x_pair)
        replaced = self._replace(key, hp, x_pair) if self._replace is not None else None
        if replaced is not None:
            if replaced.shape != x.shape:
                raise ValueError(f"{hp}: the replacement has shape {tuple(replaced.shape)}, the activation "
                                 f"{tuple(x.shape)}")
            x = replaced
        if not (self.record or edits):
            return replaced
        if sae.W_enc.is_meta:
            raise ValueError(f"the autoencoder for {key!r} is on the meta device and holds no weights (it was attached "
                             "for shard='latents' training): load the trained one with saehook.load(<run>/<hookpoint>) "
                             "and attach that")
        xs = x.to(sae.W_enc.dtype)
        codes = None
        # adding a fixed vector needs no code (unless the normalisation is per row)
        if self.record or sae.per_row_scale or any(e.kind != "add" for e in edits):
            codes = sae.encode(xs if x_in is None else x_in.to(sae.W_enc.dtype))
        if self.record:  # under a splice the values keep their graph: d(metric)/dz for attribution
            spliced = any(e.kind == "splice" for e in edits)
            self.latents[key] = Codes(codes.values if spliced else codes.values.detach(), codes.indices)
        if not edits:
            return None
        x_hat = sae.decode(codes) if any(e.kind == "splice" for e in edits) else None
        st = self._state(x)
        y = xs
        for e in edits:
            new = e.apply(key, sae, xs, y, codes, x_hat)
            m = e.mask(st.positions, st.length, st.generated, st.real)
            y = new if m is None else torch.where(m, new, y)
        return y.to(x.dtype)

    # ------------------------------------------------------------------ sub-contexts
    def _keys(self, keys) -> list[Key]:
        keys = list(self.saes) if keys is None else list(keys)
        unknown = [k for k in keys if k not in self.saes]
        if unknown:
            raise KeyError(f"not attached: {unknown}; attached keys are {list(self.saes)}")
        return keys

    def _latent_targets(self, spec: Mapping, what: str, need_values: bool) -> dict:
        targets = {}
        for key in self._keys(spec.keys()):
            sae, items = self.saes[key], spec[key]
            if need_values:
                if not isinstance(items, Mapping):
                    raise TypeError(f"{what}: expected {{latent: value}} for {key!r}, got {items!r}")
                idx = latent_ids(list(items.keys()), sae.n_latents, f"{what} at {key!r}")
                vals = [float(v) for v in items.values()]
            else:
                idx = latent_ids(items, sae.n_latents, f"{what} at {key!r}")
                vals = [0.0] * len(idx)
            dev = sae.W_dec.device
            targets[key] = (torch.tensor(idx, dtype=torch.long, device=dev),
                            torch.tensor(vals, dtype=sae.W_dec.dtype, device=dev))
        return targets

    @contextlib.contextmanager
    def _tapping(self, tap) -> Iterator[Hooked]:
        """While inside, ``tap(key, hookpoint, x)`` sees every hookpoint activation (training, evaluation)."""
        self._taps.append(tap)
        try:
            yield self
        finally:
            if tap in self._taps:
                self._taps.remove(tap)

    @contextlib.contextmanager
    def replacing(self, fn) -> Iterator[Hooked]:
        """While inside, ``fn(key, hookpoint, x)`` sees every hookpoint activation ``x`` and may return a
        tensor of the same shape to take its place (None leaves it); at a transcoder, ``x`` is the module's input
        and output side by side ``[..., 2d]`` and the replacement ``[..., d]`` takes the output's place. Autograd is
        kept: under ``torch.enable_grad()`` the rest of the model computes from the replacement, so a loss at the
        logits reaches whatever produced it (end-to-end training, :func:`saehook.e2e.e2e_step`). It acts
        after the taps and before splice / steer / ablate edits; one function at a time."""
        if not self.attached:
            raise RuntimeError("these autoencoders are detached; use the context inside `with attach(...)`")
        if self._replace is not None:
            raise RuntimeError("a replacement is already active on these hooks; nest none inside another")
        self._replace = fn
        try:
            yield self
        finally:
            self._replace = None

    @contextlib.contextmanager
    def _pushed(self, edit: Edit) -> Iterator[Hooked]:
        if not self.attached:
            raise RuntimeError("these autoencoders are detached; use the context inside `with attach(...)`")
        edit.positions = check_positions(edit.positions)
        self._edits.append(edit)
        try:
            yield self
        finally:
            if edit in self._edits:
                self._edits.remove(edit)

    def splice(self, keys: Sequence[Key] | None = None, *, keep_error: bool = False,
               positions: Positions = None):
        """Replace the hookpoint activation by the reconstruction ``x_hat`` (all attached keys by
        default). With ``keep_error=True`` the output is ``x_hat + (x - x_hat).detach()``, as in
        attribution patching: numerically the clean activation, while gradients of anything downstream
        reach the autoencoder through ``x_hat`` (the error term is a constant). While a splice acts,
        ``latents[key].values`` keep their autograd graph, so ``torch.autograd.grad(metric,
        hooked.latents[key].values)`` is the gradient with respect to the active latents (when the
        autoencoder's parameters, or the activation, require grad)."""
        return self._pushed(Edit("splice", {k: None for k in self._keys(keys)}, keep_error, positions))

    def steer(self, spec: Mapping[Key, Mapping[int, float]], *, mode: str = "add", positions: Positions = None):
        """``{key: {latent: value}}``. ``mode="add"``: add ``value * W_dec[latent] / s`` at every
        position; ``mode="clamp"``: set the latent to ``value`` (error term kept). A latent id is any
        integer in ``0 .. n_latents - 1`` (an ``int``, a NumPy integer, a 0-d integer tensor); bools,
        floats, negative and repeated ids are refused (:func:`saehook.edits.latent_ids`)."""
        if mode not in ("add", "clamp"):
            raise ValueError(f"mode must be 'add' or 'clamp', got {mode!r}")
        return self._pushed(Edit(mode, self._latent_targets(spec, "steer", True), positions=positions))

    def ablate(self, spec: Mapping[Key, Sequence[int] | int], *, positions: Positions = None):
        """``{key: latents}``: zero these latents, error term kept, so only their share is removed.
        ``latents``: one id or a sequence / 1-d tensor of ids, each as for :meth:`steer`."""
        return self._pushed(Edit("ablate", self._latent_targets(spec, "ablate", False), positions=positions))

    # ------------------------------------------------------------------ training
    def train(self, source, tokens: int | str, config=None, out=None, *, resume: bool = False,
              overwrite: bool = False, batch_size: int = 8, progress: bool = True, log_to=(), shard: str = "data",
              shards: int | None = None):
        """Train every attached autoencoder online from forward passes over ``source``.

        ``source``: a :class:`~saehook.Corpus` (windows of ``batch_size``), an iterable of ``input_ids``
        tensors ``[B, T]``, or of dicts for ``model(**batch)``. Each pass feeds every hookpoint and stops
        after the deepest one. ``tokens`` bounds the run (activation rows trained on per hookpoint): an int or
        a count like ``"200k"``, ``"2M"``. ``out``: checkpoints, ``<hookpoint>/`` autoencoders and
        ``metrics.jsonl``; a folder that is not empty is refused (``RunExistsError``, nothing written) unless
        ``resume=True`` (continue from its latest checkpoint exactly) or ``overwrite=True`` (delete its run
        files first; :mod:`saehook.runs`). ``log_to``: ``("tensorboard", "wandb")``.
        Under ``torchrun`` / ``accelerate launch`` it runs on every rank: ``shard="data"`` (DDP, each rank
        its own slice of ``source``), ``shard="layers"`` (each rank owns some autoencoders) or
        ``shard="latents"`` (each autoencoder split by its latents over ``shards`` ranks, default all; ``world =
        replicas x shards``; :mod:`saehook.latent_shard`); see :mod:`saehook.distributed`. With
        ``config.e2e_fraction > 0`` the last part of the run is trained end-to-end through the whole model, one
        step per batch (:mod:`saehook.e2e`; one process only).
        Returns a :class:`~saehook.training.TrainReport` (``report[key]``: last metrics).
        """
        from .training import train

        return train(self, source, tokens, config, out, resume=resume, overwrite=overwrite, batch_size=batch_size,
                     progress=progress, log_to=log_to, shard=shard, shards=shards)

    @contextlib.contextmanager
    def training(self, config=None, *, total_tokens: int | str | None = None):
        """Train while you run: inside, every forward through the model (your own passes, an evaluation
        loop, ``generate``) feeds the autoencoders, which take an optimizer step whenever a batch of
        ``config.batch_tokens`` rows is full. The rows are those :meth:`train` takes (:meth:`valid_mask`):
        each real token once, never padding nor a row's first ``config.skip_positions`` tokens, nothing
        again when ``generate(use_cache=False)`` or activation checkpointing re-runs it. Yields the
        :class:`~saehook.training.TrainingSession` (its ``trainers[key]`` hold step counts and ``last[key]``
        the latest metrics)."""
        from .config import TrainConfig
        from .counts import as_count
        from .session import TrainingSession

        total = None if total_tokens is None else as_count(total_tokens, "total_tokens")
        session = TrainingSession(self, config or TrainConfig(), total_tokens=total)

        def tap(key, hp, x):
            session.tap(key, hp, x)
            session.drain()

        with self._tapping(tap):
            yield session


def attach(model, saes: Mapping[Key, TopKSAE], *, record: bool = True) -> Hooked:
    """Insert autoencoders at hookpoints of a running model; use as a context manager.

    ``saes`` maps keys to autoencoders: an ``int`` is a decoder-layer index (its output, the residual
    stream), a ``str`` a module path, optionally suffixed ``":input"``. Every problem that can be seen
    before a forward (unknown path, index out of range, width mismatch) raises here. Each autoencoder
    is moved once to its hookpoint's execution device (accelerate device maps and offload included)
    and computes in its own dtype; results are cast back to the model's dtype.

        with saehook.attach(model, {20: sae}) as hooked:
            model(**batch)            # hooked.latents[20]
            with hooked.splice():     # reconstruction in place of the activation
                ...
    """
    return Hooked(model, saes, record=record)
