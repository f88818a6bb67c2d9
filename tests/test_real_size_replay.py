"""The real-size dry run's replay of repeated model calls (benchmarks/_real_size_replay.py) keeps its memory counts.

On real CPU tensors under the dry run's tracker: a module whose calls keep nothing but their output is replayed after
two checked runs, and the tracker's peaks equal those of running every call; a module that keeps something is never
replayed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _real_size_replay import CHECKED_RUNS, CallReplay  # noqa: E402
from _real_size_track import MemoryTracker  # noqa: E402


class NoHostBank:
    """Stands for the pack's host bank class (none is made here)."""

    def __init__(self) -> None:
        self.moved = 0


class Scratchy(torch.nn.Module):
    """A call that needs a large scratch buffer besides its output, and optionally keeps a copy of its input."""

    def __init__(self, keep: bool = False) -> None:
        super().__init__()
        self.keep = keep
        self.kept: list[torch.Tensor] = []
        self.bank: NoHostBank | None = None  # a host bank the call reads back (counting the bytes moved)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.ones(x.shape[0], 4096)  # 16 KiB a row, freed at return
        if self.keep:
            self.kept.append(x.clone())
        if self.bank is not None:
            self.bank.moved += x.nbytes
        return x * scratch[:, :1]


def run_calls(module: Scratchy, replay_on: bool, calls: int = 6) -> tuple[MemoryTracker, CallReplay, list]:
    tracker = MemoryTracker()
    replay = CallReplay(tracker, counting=lambda: False)
    outputs = []  # the caller keeps every output: the live bytes grow, so later calls make the peak
    with tracker:
        tracker.set_phase("inversion")
        if replay_on:
            with replay.installed(module, NoHostBank):
                for step in range(calls):
                    outputs.append(module(torch.full((8, 64), float(step))))
        else:
            for step in range(calls):
                outputs.append(module(torch.full((8, 64), float(step))))
    return tracker, replay, outputs


def peaks(tracker: MemoryTracker) -> dict:
    return {phase: {d: (p.bytes, dict(p.holders)) for d, p in by_device.items()} for phase, by_device in
            tracker.peaks.items()}


def test_a_call_that_keeps_nothing_is_replayed_with_the_peaks_of_running_it():
    full, _, _ = run_calls(Scratchy(), replay_on=False)
    replayed, replay, outputs = run_calls(Scratchy(), replay_on=True)
    assert replay.ran == CHECKED_RUNS and replay.replayed == 6 - CHECKED_RUNS, replay.summary()
    assert peaks(replayed) == peaks(full)
    # The last call made the peak (5 outputs live before it, 32 KiB scratch during it), not a checked run.
    assert full.peaks["inversion"]["cpu"].bytes >= 6 * 8 * 64 * 4 + 8 * 4096 * 4
    assert [tuple(o.shape) for o in outputs] == [(8, 64)] * 6


def test_the_comparison_fails_when_a_replay_loses_the_calls_peak(monkeypatch):
    full, _, _ = run_calls(Scratchy(), replay_on=False)
    monkeypatch.setattr(MemoryTracker, "note_peak", lambda self, kind, total, holders: None)
    replayed, replay, _ = run_calls(Scratchy(), replay_on=True)
    assert replay.replayed > 0
    assert peaks(replayed) != peaks(full)


def test_a_call_that_keeps_something_is_never_replayed():
    module = Scratchy(keep=True)
    tracker = MemoryTracker()
    replay = CallReplay(tracker, counting=lambda: False)
    with tracker, replay.installed(module, NoHostBank):
        tracker.set_phase("edit")
        for _ in range(5):
            module(torch.zeros(8, 64))
    assert replay.replayed == 0 and replay.ran == 5, replay.summary()


@pytest.mark.parametrize("replay_on", [False, True])
def test_a_replayed_call_credits_the_host_bank_with_the_bytes_it_would_move(replay_on):
    module = Scratchy()
    tracker = MemoryTracker()
    replay = CallReplay(tracker, counting=lambda: False)
    with tracker, replay.installed(module, NoHostBank):
        tracker.set_phase("edit")
        module.bank = NoHostBank()  # made after install: registered as the pack's host banks are
        if not replay_on:
            replay.layouts = _NeverReplay()
        for _ in range(5):
            module(torch.zeros(8, 64))
    assert replay.replayed == (5 - CHECKED_RUNS if replay_on else 0), replay.summary()
    assert module.bank.moved == 5 * 8 * 64 * 4


class _NeverReplay(dict):
    """Layouts that never reach the checked count (every call runs)."""

    def setdefault(self, key, default):
        default.never = True
        return default


def test_calls_made_while_flops_are_counted_always_run():
    tracker = MemoryTracker()
    replay = CallReplay(tracker, counting=lambda: True)
    module = Scratchy()
    with tracker, replay.installed(module, NoHostBank):
        tracker.set_phase("edit")
        for _ in range(5):
            module(torch.zeros(8, 64))
    assert replay.replayed == 0 and replay.ran == 5
