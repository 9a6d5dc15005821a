"""Pipeline schedules as arithmetic: who runs what when, and how much of the step each stage idles.

A pipeline of ``p`` stages runs ``m`` micro-batches. Each stage runs every micro-batch's forward
("F", i) once and its backward ("B", i) once; the forward of micro-batch i on stage s needs stage
s - 1's forward of it, and its backward needs stage s + 1's backward of it. Which ready piece of work
a stage does next is its *schedule* (:func:`schedule_order`):

- **GPipe** (Huang et al., 2019): every forward, then every backward. Stage s holds the activations of
  all ``m`` micro-batches at the turn.
- **1F1B** (Narayanan et al., 2019, PipeDream): ``p - s - 1`` forwards to fill the pipe, then one
  forward and one backward in turn, then the remaining backwards. Stage s holds at most ``p - s``
  (:func:`peak_in_flight_formula`).

Both leave each stage idle for the same share of the step, the *bubble* ``(p - 1) / (m + p - 1)``
(:func:`bubble_formula`), when every stage's pieces take the same time. Nothing here runs a model:
a timeline is a list per stage of :data:`Event` tuples (kind, micro-batch, start, end).

- :func:`simulate_schedule` builds the timeline of an ideal machine: messages take no time and each
  stage starts its next piece the moment the schedule allows, with given durations.
- :func:`replay_schedule` feeds a measured run's durations (the wall-clock ones, or others measured
  alongside them, such as each piece's CPU time) into that ideal machine: what the stages' own work
  leaves idle, with everything between the pieces taken away.
- :func:`bubble_fraction` measures the idle share of any timeline, simulated or measured.

Built in: 08_model_parallel
"""

from __future__ import annotations

from minigpt.checks import positive_int

SCHEDULES = ("gpipe", "1f1b")
Event = tuple[str, int, float, float]  # ("F" or "B", micro-batch, start seconds, end seconds)


def schedule_order(schedule: str, stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """The order in which stage ``stage`` runs its ``m`` forwards ("F", i) and backwards ("B", i).

    GPipe: F0 ... F(m-1), then B0 ... B(m-1). 1F1B: ``w = min(p - s - 1, m)`` warm-up forwards, then
    for each remaining micro-batch one forward and the backward of the oldest one held, then the ``w``
    backwards left (the cool-down). Backwards run in micro-batch order in both, so the gradients a
    stage receives arrive in the order it asks for them.

    Built in: 08_model_parallel
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES}")
    positive_int("micro_batches", micro_batches)
    if not 0 <= stage < stages:
        raise ValueError(f"stage={stage} must be in [0, {stages})")
    m = micro_batches
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(stages - stage - 1, m)
    order = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        order += [("F", warm + i), ("B", i)]
    return order + [("B", i) for i in range(m - warm, m)]


def bubble_formula(stages: int, micro_batches: int) -> float:
    """The idle share of a pipeline step when every stage's forward and backward take the same time:
    the step lasts ``m + p - 1`` forward-and-backward slots, of which each stage is busy ``m``, so it
    idles ``(p - 1) / (m + p - 1)`` of it (GPipe and 1F1B alike).

    Built in: 08_model_parallel
    """
    positive_int("stages", stages)
    positive_int("micro_batches", micro_batches)
    return (stages - 1) / (micro_batches + stages - 1)


def peak_in_flight_formula(schedule: str, stage: int, stages: int, micro_batches: int) -> int:
    """How many micro-batches' activations stage ``stage`` holds at most: GPipe ``m``; 1F1B
    ``min(p - s, m)``.

    Built in: 08_model_parallel
    """
    schedule_order(schedule, stage, stages, micro_batches)  # validates the arguments
    return micro_batches if schedule == "gpipe" else min(stages - stage, micro_batches)


def simulate_schedule(schedule: str, stages: int, micro_batches: int, forward: float = 1.0,
                      backward: float = 2.0, durations: dict[tuple[str, int, int], float] | None = None,
                      ) -> list[list[Event]]:
    """The ideal timeline: each stage runs its :func:`schedule_order`, every forward takes ``forward``
    and every backward ``backward`` time units (or, with ``durations``, piece (kind, stage,
    micro-batch) takes ``durations[kind, stage, i]``), messages arrive at once and nothing runs
    between two pieces of work. A forward starts when the stage is free and the previous stage has
    finished that micro-batch's forward; a backward when the next stage has finished its backward (on
    the last stage: when its own forward has finished). Returns each stage's events (kind,
    micro-batch, start, end).

    Built in: 08_model_parallel
    """
    if not (forward > 0 and backward > 0):
        raise ValueError(f"forward={forward} and backward={backward} must be positive durations")
    orders = [schedule_order(schedule, s, stages, micro_batches) for s in range(stages)]
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, micro-batch) -> end time
    events: list[list[Event]] = [[] for _ in range(stages)]
    free, nxt = [0.0] * stages, [0] * stages
    while any(nxt[s] < len(orders[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if nxt[s] == len(orders[s]):
                continue
            kind, i = orders[s][nxt[s]]
            need = (("F", s - 1, i) if s > 0 else None) if kind == "F" else \
                (("B", s + 1, i) if s < stages - 1 else ("F", s, i))
            if need is not None and need not in done:
                continue
            start = max(free[s], done[need] if need is not None else 0.0)
            if durations is not None:
                end = start + durations[kind, s, i]
            else:
                end = start + (forward if kind == "F" else backward)
            done[(kind, s, i)], free[s] = end, end
            events[s].append((kind, i, start, end))
            nxt[s] += 1
            progressed = True
        if not progressed:  # cannot happen for the two schedules here; a guard against a bad order
            raise RuntimeError(f"schedule {schedule!r} deadlocks: no stage can start its next step")
    return events


def replay_schedule(schedule: str, events: list[list[Event]],
                    durations: list[list[float]] | None = None) -> list[list[Event]]:
    """A measured run replayed on the ideal machine of :func:`simulate_schedule`: messages take no
    time and nothing runs between two pieces of work. Each piece keeps the duration it was measured
    with: by default its wall-clock ``end - start``; with ``durations`` (one list per stage, in the
    order of that stage's events) the one given, for instance the CPU time its thread spent on it.

    The wall-clock replay's bubble against the formula's shows what unequal work costs; the measured
    bubble against that replay's, what messages and the time between pieces cost. A replay with CPU
    times leaves out, besides, how much longer a piece took because something else ran on its core:
    it is the idle share that the stages' own work, in the order it ran, leaves.

    Built in: 08_model_parallel
    """
    if not events or not all(events):
        raise ValueError("events must hold at least one event per stage")
    if durations is None:
        durations = [[end - start for _, _, start, end in stage] for stage in events]
    if [len(d) for d in durations] != [len(stage) for stage in events]:
        raise ValueError(f"durations of lengths {[len(d) for d in durations]} must give one per event: "
                         f"{[len(stage) for stage in events]}")
    if any(d <= 0 for stage in durations for d in stage):
        raise ValueError("durations must be positive")
    by_piece = {(kind, s, i): d for s, stage in enumerate(events)
                for (kind, i, _, _), d in zip(stage, durations[s])}
    return simulate_schedule(schedule, len(events), len(events[0]) // 2, durations=by_piece)


def bubble_fraction(events: list[list[Event]]) -> float:
    """The measured bubble: the share of the pipeline's step (from the first start on any stage to the
    last end) in which a stage computed nothing, averaged over the stages. Waiting for a message counts
    as idle, as it does on a real machine.

    Built in: 08_model_parallel
    """
    if not events or not all(events):
        raise ValueError("events must hold at least one event per stage")
    start = min(e[2] for stage in events for e in stage)
    end = max(e[3] for stage in events for e in stage)
    busy = sum(e[3] - e[2] for stage in events for e in stage)
    return 1.0 - busy / (len(events) * (end - start))
