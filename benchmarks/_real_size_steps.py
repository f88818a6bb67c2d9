"""The edit's FLOPs per step over the full step mix, for the real-size dry run.

The steps of an edit differ: PnP injects the source's attention in the first ``pnp_attn_t`` of the steps and its
residual features in the first ``pnp_f_t``, and the steps that inject run more of the source branch. A few-step
run has a different mix of step kinds than the full ``--steps`` run, so its mean is not the full run's. Here each
step's kind is what the editor's own ``step_needs`` says of it (attention injection or not, residual injection
or not), recorded from the edit's plan; the measured FLOPs of each kind are averaged over the run's steps of that
kind and weighted by how many steps of that kind the editor visits in a ``--steps`` run:

    per step = sum over kinds (steps of the kind in the full run x measured FLOPs of the kind) / visited steps.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import contextmanager

KIND_NAMES = {(True, True): "attention+residual injection", (False, True): "residual injection",
              (True, False): "attention injection", (False, False): "no injection"}


def _kind(needs) -> tuple[bool, bool]:
    return bool(needs.attention_injection), bool(needs.residual_injection)


class StepMix:
    """Records the edit plan's ``step_needs`` call of each built-in editor (the arguments the engine passed)."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, tuple]] = []

    @contextmanager
    def installed(self):
        from comfyui_tokenflow.engine.editors import usable_editors

        editors = list(usable_editors().values())
        for editor in editors:
            original = type(editor).step_needs

            def recorded(full, options, layout, unet, _editor=editor, _original=original):
                self.calls.append((_editor, (options, layout, unet)))
                return _original(_editor, full, options, layout, unet)

            editor.step_needs = recorded  # an instance attribute: observes, the class method still answers
        try:
            yield self
        finally:
            for editor in editors:
                vars(editor).pop("step_needs", None)

    def kinds(self, steps: int) -> list[tuple[bool, bool]]:
        """The kind of each step the last planned edit visits in a ``steps``-step run, in order."""
        from comfyui_tokenflow.tokenflow_ops.schedule import editing_timesteps

        editor, (options, layout, unet) = self.calls[-1]
        needs = type(editor).step_needs(editor, editing_timesteps(steps), options, layout, unet)
        return [_kind(needs[t]) for t in editor.timesteps(steps, options)]

    def weighted(self, measured: list[float], run_steps: int, steps: int) -> tuple[float, str]:
        """(FLOPs per step over the ``steps``-step mix, how it was weighted) from the ``run_steps`` run's per-step
        FLOPs ``measured`` (one entry per visited step, in order)."""
        run_kinds = self.kinds(run_steps)
        if len(run_kinds) != len(measured):
            raise RuntimeError(f"the edit's FLOPs were counted for {len(measured)} steps but its plan visits "
                               f"{len(run_kinds)}: one model evaluation per step is assumed")
        by_kind: dict[tuple[bool, bool], list[float]] = defaultdict(list)
        for kind, flops in zip(run_kinds, measured):
            by_kind[kind].append(flops)
        full = Counter(self.kinds(steps))
        missing = [KIND_NAMES[k] for k in full if k not in by_kind]
        if missing:  # not weighted: the run's own mean, said so
            return sum(measured) / len(measured), (f"NOT weighted (the {run_steps}-step run has no step of kind "
                                                   f"{', '.join(missing)}: raise --run-steps)")
        total = sum(n * sum(by_kind[k]) / len(by_kind[k]) for k, n in full.items())
        how = ", ".join(f"{n} x {KIND_NAMES[k]} ({sum(by_kind[k]) / len(by_kind[k]) / 1e12:.2f} T)"
                        for k, n in full.items())
        return total / sum(full.values()), how
