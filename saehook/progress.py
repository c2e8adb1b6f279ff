"""The progress of a training run: which phase is running, and a tokens bar whose rate starts with training.

A run goes through these phases, in order; each is the bar's description and an INFO log line
(``saehook.progress``), and :attr:`TrainProgress.phases` lists those entered:

- ``"filling shuffle buffer"`` ``(12,000/65,536 rows)``: forward passes stream rows into the shuffle
  buffer; no batch can leave it yet, so no token is trained and no rate is measured. On SmolLM2 with the
  default 65,536-row buffer this is the first 30-90 s of a run on two CPU cores.
- ``"initialising scale and b_dec"``: fitted on the first ``init_samples`` rows, as soon as the buffer holds
  them (with the defaults, 32,768 rows: half-way through the fill, which then goes on)
  (:meth:`saehook.trainer.SAETrainer.initialize`).
- ``"training"``: optimizer steps; the bar counts trained tokens.
- ``"end-to-end"``: with ``TrainConfig.e2e_fraction > 0``, the last part of the run (:mod:`saehook.e2e`).

The bar's clock (elapsed time, rate, ETA) restarts at the first optimizer step: the rate is trained
tokens per second of training, never diluted by the fill, so the ETA is (tokens left) / (that rate).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

__all__ = ["TrainProgress"]


class TrainProgress:
    """A tqdm bar over the run's tokens (to stderr) plus the list of phases entered.

    Args:
        total: tokens of the run.
        initial: tokens already trained (a resumed run).
        enabled: draw the bar (the phases are logged and listed either way).
        desc: the bar's prefix; the phase follows it.
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "saehook train"):
        from tqdm.auto import tqdm

        self.desc = desc
        self.bar = tqdm(total=total, initial=min(initial, total), unit="tok", unit_scale=True, disable=not enabled,
                        desc=desc)
        self.phases: list[str] = []
        """The phases entered, in order (each once per entry)."""
        self.training = False

    def phase(self, name: str, detail: str = "") -> None:
        """Enter phase ``name`` (logged once per entry) and show it, with ``detail``, in the bar now."""
        if not self.phases or self.phases[-1] != name:
            self.phases.append(name)
            log.info("phase: %s%s", name, detail)
        self.bar.set_description(f"{self.desc}: {name}{detail}", refresh=True)

    def filling(self, held: int, needed: int) -> None:
        """The buffer holds ``held`` of the ``needed`` rows before its first batch (no step taken yet)."""
        self.phase("filling shuffle buffer", f" ({held:,}/{needed:,} rows)")

    def trained(self, tokens: int, postfix: dict | None = None) -> None:
        """An optimizer step brought the run to ``tokens`` trained tokens; ``postfix`` goes after the bar.

        The first call restarts the bar's clock at ``tokens`` (tqdm's ``initial``): rate and ETA count only
        the time since the first step."""
        bar = self.bar
        tokens = min(int(tokens), bar.total)
        if not self.training:
            self.training = True
            enter = not self.phases or self.phases[-1] != "end-to-end"
            if enter:  # before reset, which redraws the bar
                bar.set_description(f"{self.desc}: training", refresh=False)
            bar.reset(total=bar.total)  # start_t = now, empty rate averages
            bar.initial = bar.n = bar.last_print_n = tokens
            if enter:
                self.phase("training")
        if postfix:
            bar.set_postfix(postfix, refresh=False)
        bar.update(tokens - bar.n)
        bar.refresh()

    def close(self) -> None:
        """Close the bar (the last state stays on screen)."""
        self.bar.close()
