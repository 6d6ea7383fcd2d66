"""Where each training step reads: one data position, global across phases and rollbacks.

Pure (no I/O): :class:`Plan` maps a step to the rows it trains on, from the phases
(``train.phases``), the mixture (:class:`~btlm_jax.data.mixtures.Interleave`), each source's
*layout* (how many rows of a phase's length each of its units holds) and the run's rollback log
(:class:`Rollback`, persisted with the checkpoints and in ``RUN/rollbacks.json``). So the batch of
every step is a pure function of (config, step, rollback log): resume, elastic resume and the
batch inspector (``btlm-batches``) compute the same rows as the training loop did.

Units and epochs. Each source's token stream (the packed store, in corpus order) is cut into
*units* that every phase can cut rows from. With concat packing a unit is ``C`` consecutive tokens,
``C`` the least common multiple of the phases' sequence lengths (BTLM: 8192 for 2048 and 8192; a
run with one length: one row per unit), so a unit holds ``C / L`` rows of every phase's length
``L`` and a row never leaves its unit (its last target is the next token of the stream). With
document packing and one length a unit is one packed row; with several lengths it is the
documents that start in a stretch of ``DOC_UNIT_ROWS x`` the longest length tokens, packed on
their own at each length (see :mod:`btlm_jax.data.store`). An *epoch* of a source is its units in
a random order, a fresh permutation per epoch, seeded by (``seed``, source) and the epoch only,
so every phase reads the same order. The units' rows are read in stream order.

The data position. Each source has one cursor: the position of the next unread unit in its
sequence of epochs (unit position ``P`` is unit ``perm_e(P mod n)`` of epoch ``e = P // n``). A
*segment* is a stretch of steps with one phase and no rollback; its rows follow the interleave from
row 0, and source ``s``'s ``k``-th row of the segment is row ``k`` counted from the segment's start
position in ``s``'s sequence of units. A segment starts at the first unit that no earlier segment
touched (a partly read unit is left), so:

* a phase packs rows at its own length from the next unread position; a run whose phases add up
  to at most one pass over a source reads each of its tokens at most once;
* a rollback (diverged at step ``N``, restored to checkpoint ``G``, ``skip`` =
  ``train.rollback_skip_batches``) starts a new segment at step ``G`` (``G + 1`` in the metrics'
  numbering is its first update) at, per source, the later of: the position ``skip`` batches of
  ``G``'s phase past ``G``'s position, and the position after the diverged step's batch. Steps are
  rewound to ``G``; the data never is: the batches read between ``G`` and the spike are skipped
  (at least those), so the new trajectory never trains on data the discarded one trained on.

Steps here are batch indices: the batch of index ``i`` is the one the update from ``i`` to
``i + 1`` completed steps trains on (``step: i + 1`` in ``metrics.jsonl``).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class Rollback:
    """One rollback: step ``diverged`` (metrics numbering) was bad, checkpoint ``restored`` was
    restored, and training went on from it skipping ``skip`` batches (at least up to the spike)."""

    diverged: int
    restored: int
    skip: int

    def to_json(self) -> dict:
        return {"diverged": self.diverged, "restored": self.restored, "skip": self.skip}

    @classmethod
    def from_json(cls, d: dict) -> "Rollback":
        return cls(int(d["diverged"]), int(d["restored"]), int(d["skip"]))


def parse_rollbacks(items) -> list[Rollback]:
    return [x if isinstance(x, Rollback) else Rollback.from_json(x) for x in (items or [])]


class Layout(Protocol):
    """How a source's units hold the rows of a phase (implemented by the pipeline)."""

    def end(self, source: int, phase: int, start: int, rows: int) -> int:
        """The unit position just after the last of ``rows`` rows read from ``start``."""


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int  # first batch index of the segment
    phase: int
    units: tuple[int, ...]  # per active source: the unit position its rows start at


class Plan:
    """The segments of the run's current trajectory (see the module docstring)."""

    def __init__(self, phases: Sequence[tuple[int, int, int]], interleave, layout: Layout,
                 rollbacks: Sequence[Rollback] = ()):
        self.phases = [tuple(int(x) for x in p) for p in phases]
        self.starts = [sum(p[2] for p in self.phases[:i]) for i in range(len(self.phases))]
        self.total = sum(p[2] for p in self.phases)
        self.interleave, self.layout = interleave, layout
        self.num_sources = len(interleave.W)
        self.rollbacks = parse_rollbacks(rollbacks)
        self.segments: list[Segment] = []
        self._plan_from(Segment(0, 0, (0,) * self.num_sources))
        for i, rb in enumerate(self.rollbacks):
            if not (0 <= rb.restored < rb.diverged <= self.total and rb.skip >= 0):
                raise ValueError(f"rollback {i + 1} of the run's log ({rb}) does not fit a run of "
                                 f"{self.total} steps")
            high = self.end_at(rb.diverged)  # after the diverged step's batch (index N - 1)
            seg = self.segment(rb.restored)
            skipped = self._end(seg, rb.restored + rb.skip)
            self._plan_from(Segment(rb.restored, seg.phase,
                                    tuple(max(a, b) for a, b in zip(high, skipped))))

    def phase_of(self, index: int) -> int:
        return max(0, bisect.bisect_right(self.starts, index) - 1)

    def segment(self, index: int) -> Segment:
        """The segment of the batch of index ``index``."""
        k = bisect.bisect_right([s.start for s in self.segments], index) - 1
        return self.segments[max(k, 0)]

    def _end(self, seg: Segment, index: int) -> tuple[int, ...]:
        """Per source, the unit position after the batches ``seg.start .. index - 1`` read at
        ``seg``'s phase (past the segment's end if ``index`` is: a skip)."""
        _, b, _ = self.phases[seg.phase]
        rows = (index - seg.start) * b
        return tuple(self.layout.end(i, seg.phase, seg.units[i],
                                     self.interleave.count_before(i, rows))
                     for i in range(self.num_sources))

    def end_at(self, index: int) -> tuple[int, ...]:
        """Per source, the unit position after the batches of indices ``< index``."""
        if index <= 0:
            return (0,) * self.num_sources
        return self._end(self.segment(index - 1), index)

    def _plan_from(self, seg: Segment) -> None:
        """Replaces the trajectory from ``seg.start`` on by ``seg`` and the later phases."""
        self.segments = [s for s in self.segments if s.start < seg.start] + [seg]
        cur = seg
        for phase in range(seg.phase + 1, len(self.phases)):
            cur = Segment(self.starts[phase], phase, self._end(cur, self.starts[phase]))
            self.segments.append(cur)

    def rows(self, index: int, lo: int, hi: int) -> tuple[Segment, list[tuple[int, int]]]:
        """The segment of batch ``index`` and ``(source, k)`` of its rows ``lo .. hi - 1``: row
        ``k`` of the source counted from the segment's start position."""
        seg = self.segment(index)
        _, b, _ = self.phases[seg.phase]
        h0 = (index - seg.start) * b
        return seg, self.interleave.rows(h0 + lo, h0 + hi)
