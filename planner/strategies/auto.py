"""`auto`: every strategy's plan on the fastest 1..N devices, replayed; the fastest wins.

The strategies search with their own cost models, which price the leader-relayed
runtime. What a client measures is the direct data plane, which
`edgedi.planner.replay` replays step by step with each device's measured costs.
So `auto` asks the row strategies for plans on growing sets of the fastest devices
(always with the leader, which takes the image and runs the tail), replays each,
and keeps the one with the lowest replayed latency — `single` included, so a plan
is only ever used when it is predicted faster than one device.

Where rows run out — late residual units on 13×13 and 7×7 maps, whose halos make
row strips nearly whole maps — `auto` also tries each candidate with its tail of
units from a stage start on replaced by one *channel* segment
(`edgedi.models.channel_split`): every device of the candidate, or of the fleet,
computes a share of the filters proportional to its speed from the whole map, with
one exchange of partial sums per unit. No published system partitions this way.

A leader first runs a few jobs with each of the best-predicted candidates and the
best one-device plan (`to_explore`), then keeps the fastest measured:
`measured` (candidate name → measured median latency, seconds) lets the leader
feed back what plans really did: a candidate with a measurement is judged by it
rather than by its prediction, so a plan that disappoints in practice loses to the
next best one, which is tried and measured in turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from edgedi.broker.plan import Part, Plan, Segment, StepTimes
from edgedi.models.units import ModelSpec, channel_splittable, hidden_channels, split_rows
from edgedi.planner.cost import NetworkModel
from edgedi.planner.errors import InfeasiblePlanError
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.profiles import DeviceProfile
from edgedi.planner.replay import channel_phases, replay_plan, supports_replay
from edgedi.planner.strategies.base import Decision, Strategy, get_strategy, register

__all__ = ["Auto", "Candidate", "Channels", "candidates", "choose", "labelled", "to_explore"]

# Strategies whose row-strip plans run on the direct data plane. DeepThings cuts a
# grid where it can (relayed, so not a candidate) and row strips around attention
# gates: those fused two-segment plans measured fastest on the compact models.
ROW_STRATEGIES = ("edgeci", "edgedi", "edgeld", "proportional", "deepthings")
# A leader measures this many best-predicted candidates on real jobs before it settles.
EXPLORED = 2


class Candidate:
    """One plan `auto` considered: its name, the plan, and its replayed latency."""

    def __init__(self, name: str, plan: Plan, predicted_s: float) -> None:
        self.name = name
        self.plan = plan
        self.predicted_s = predicted_s


def _set_sizes(count: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... up to `count` (and `count` itself)."""
    sizes, size = [], 1
    while size < count:
        sizes.append(size)
        size = size + 1 if size < 4 else size + size // 2
    sizes.append(count)
    return sorted(set(sizes))


def candidates(
    spec: ModelSpec,
    devices: Sequence[DeviceProfile],
    *,
    leader: str,
    network: NetworkModel | None = None,
    epoch: int = 0,
    created_at: float | None = None,
    tail_on_leader: bool = False,
) -> list[Candidate]:
    """Every row strategy's plan on the fastest k devices, with replayed latencies."""
    network = network or NetworkModel()
    problem = PlanningProblem(spec, devices, network, leader, tail_on_leader)
    speed = {d: float(c) for d, c in zip(problem.fleet.ids, problem.fleet.capability, strict=True)}
    ranked = sorted((d.device for d in devices), key=lambda d: (-speed[d], d))
    found: list[Candidate] = []
    for size in _set_sizes(len(ranked)):
        chosen = set(ranked[:size]) | {leader}
        subset = [d for d in devices if d.device in chosen]
        names = ("single",) if size == 1 else ROW_STRATEGIES
        for name in names:
            try:
                plan = get_strategy(name).plan(
                    spec,
                    subset,
                    epoch=epoch,
                    leader=leader,
                    network=network,
                    created_at=created_at,
                    tail_on_leader=tail_on_leader,
                )
            except InfeasiblePlanError:
                continue
            if not supports_replay(plan):
                continue
            replayed = replay_plan(plan, spec, devices, network)
            found.append(Candidate(f"{name}/{size}", plan, replayed.latency_s))
    if not found:
        raise InfeasiblePlanError(f"no strategy found a row plan for {spec.name}")
    return found + _channel_candidates(found, spec, devices, speed, ranked, network)


def _channel_candidates(
    found: Sequence[Candidate],
    spec: ModelSpec,
    devices: Sequence[DeviceProfile],
    speed: Mapping[str, float],
    ranked: Sequence[str],
    network: NetworkModel,
) -> list[Candidate]:
    """Every candidate with its units from a stage start on (where it has a segment
    boundary) as one channel segment, over the candidate's devices or the whole fleet;
    the best per device count."""
    spatial = spec.spatial_units
    splittable = [channel_splittable(unit) for unit in spatial]
    # Channel segments start where a stage starts (the map shrinks, the width grows):
    # a start within a stage saves little more and costs a replay per candidate,
    # which a leader pays on its own CPU at every re-plan.
    starts = {
        unit.index
        for unit in spatial
        if splittable[unit.index] and unit.in_shape[1] != unit.out_shape[1]
    }
    if any(splittable):
        starts.add(splittable.index(True))
    height = spatial[-1].out_shape[1]
    variants: list[Candidate] = []
    seen: set[tuple[object, ...]] = set()
    for candidate in found:
        plan = candidate.plan
        for position, segment in enumerate(plan.segments):
            first = segment.first_unit
            if position == 0 or first not in starts or not all(splittable[first:]):
                continue
            for group in (plan.devices_used, ranked):
                chosen = sorted(set(group) | {plan.leader}, key=lambda d: (-speed[d], d))
                key = (plan.segments[:position], tuple(chosen))
                if len(chosen) < 2 or len(chosen) > height or key in seen:
                    continue
                seen.add(key)
                channel = _channel_segment(spec, devices, plan, first, chosen, speed, network)
                prefix = [
                    s.model_copy(update={"sink": plan.leader}) for s in plan.segments[:position]
                ]
                try:
                    varied = Plan.model_validate(
                        {**plan.model_dump(), "segments": [*prefix, channel]}
                    )
                    replayed = replay_plan(varied, spec, devices, network)
                except (ValueError, InfeasiblePlanError):
                    continue
                name = f"{candidate.name}+channels{first}/{len(chosen)}"
                varied = varied.model_copy(update={"predicted_bytes": int(replayed.bytes_moved)})
                variants.append(Candidate(name, varied, replayed.latency_s))
    # The best variant per device count: near-identical variants would only make the
    # leader measure one after another (`to_explore`) for nothing.
    best: dict[int, Candidate] = {}
    for variant in variants:
        count = len(variant.plan.segments[-1].parts)
        if count not in best or variant.predicted_s < best[count].predicted_s:
            best[count] = variant
    return list(best.values())


def _channel_segment(
    spec: ModelSpec,
    devices: Sequence[DeviceProfile],
    plan: Plan,
    first: int,
    chosen: Sequence[str],
    speed: Mapping[str, float],
    network: NetworkModel,
) -> Segment:
    """Units `first..` split by channels over `chosen`, shares by speed."""
    spatial = spec.spatial_units
    units = spatial[first:]
    hidden = hidden_channels(units)
    out = units[-1].out_shape
    shares = split_rows(hidden, [speed[d] for d in chosen])
    rows = split_rows(out[1], [1.0] * len(chosen))
    profiles = {d.device: d for d in devices}
    parts = []
    for device, share, routing in zip(chosen, shares, rows, strict=True):
        phases = channel_phases(profiles[device], plan.model_digest, units, len(share) / hidden)
        parts.append(
            Part(
                device=device,
                rows=(routing.start, routing.stop),
                channels=(share.start, share.stop),
                compute_s=sum(phases),
            )
        )
    slowest = max(part.compute_s for part in parts)
    rounds = len(units) * network.gate_round_s
    return Segment(
        first_unit=first,
        last_unit=spatial[-1].index,
        out_height=out[1],
        out_width=out[2],
        reductions=len(units),
        sink=plan.tail_device,
        parts=tuple(parts),
        predicted=StepTimes(compute_s=slowest, reductions_s=rounds, total_s=slowest + rounds),
    )


def choose(found: Sequence[Candidate], measured: Mapping[str, float] | None = None) -> Candidate:
    """The candidate with the lowest expected latency: its measured median when the
    leader has one, else its replayed prediction."""
    measured = measured or {}
    return min(found, key=lambda c: (measured.get(c.name, c.predicted_s), c.name))


def to_explore(found: Sequence[Candidate], count: int = EXPLORED) -> list[Candidate]:
    """The candidates worth measuring on real jobs, best predicted first: the `count`
    best, and the best one-device plan (the baseline no plan may lose to)."""
    ranked = sorted(found, key=lambda c: (c.predicted_s, c.name))
    chosen = ranked[:count]
    alone = [c for c in ranked if len(c.plan.devices_used) == 1][:1]
    return chosen + [c for c in alone if c not in chosen]


@register
class Auto(Strategy):
    """See the module docstring."""

    name = "auto"
    summary = "fastest replayed plan of every strategy"

    def plan_problem(
        self,
        problem: PlanningProblem,
        *,
        epoch: int = 0,
        plan_id: str | None = None,
        created_at: float | None = None,
    ) -> Plan:
        found = candidates(
            problem.spec,
            problem.devices,
            leader=problem.fleet.ids[problem.leader],
            network=problem.network,
            epoch=epoch,
            created_at=created_at,
            tail_on_leader=problem.tail_on_leader,
        )
        return labelled(choose(self.among(found)), plan_id, problem.devices, prefix=self.name)

    def among(self, found: list[Candidate]) -> list[Candidate]:
        """The candidates this strategy chooses from: all of them."""
        return found

    def decide(self, problem: PlanningProblem) -> Decision:
        raise InfeasiblePlanError(f"{self.name} chooses among whole plans, not segments")


@register
class Channels(Auto):
    """`auto`'s best candidate with a channel segment: rows early, channels late.

    For comparing partitionings and for tests; `auto` weighs these against every
    other candidate. A model without residual units to split gets `auto`'s choice."""

    name = "channels"
    summary = "rows early, output channels late (auto's best channel plan)"

    def among(self, found: list[Candidate]) -> list[Candidate]:
        split = [c for c in found if any(s.channel_split for s in c.plan.segments)]
        return split or found


def labelled(
    candidate: Candidate,
    plan_id: str | None = None,
    devices: Sequence[DeviceProfile] = (),
    *,
    prefix: str = "auto",
) -> Plan:
    """The candidate's plan, named after it and predicting its replayed latency.

    It lists every device `auto` planned for (`devices`), used or not: the plan was
    made for all of them.
    """
    listed = [*candidate.plan.devices]
    listed += [d.device for d in devices if d.device not in listed]
    update: dict[str, object] = {
        "devices": tuple(listed),
        "strategy": f"{prefix}:{candidate.name}",
        "predicted_latency_s": candidate.predicted_s,
        "predicted_throughput": 1.0 / candidate.predicted_s if candidate.predicted_s else 0.0,
    }
    if plan_id is not None:
        update["plan_id"] = plan_id
    return candidate.plan.model_copy(update=update)
