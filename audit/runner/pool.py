"""The actor pool a job asks for: how many actors, what each reserves, and how the pool is described.

A pool has a floor and a ceiling (``resources.actors``: ``auto``, ``N`` or
``{min, max}``) and per-actor resources (CPUs, GPUs, custom resources, an
accelerator type).  :func:`plan` turns the spec and the cluster's resources
into :class:`Resources` (a pure function).  On a cluster that can grow (any
cluster the job joins, or one started before the job in the same process), the
actors are requested even when no node has their resources yet: Ray's
autoscaler sees the pending actors and adds nodes for them.  On the private
local Ray that ``audit run`` starts without ``--address`` nothing can join,
so a request it can never meet is refused at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from audit.errors import AuditError

#: The Ray resource name that ``accelerator_type: X`` becomes (Ray asks for a sliver of it).
ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_SLIVER = 0.001
#: ``resources.start_timeout_s`` when a spec leaves it out (the schema's default, same value)
DEFAULT_START_TIMEOUT_S = 900.0


@dataclass
class Resources:
    """Actors and what each one reserves (:func:`plan`).

    ``actors`` is the pool's ceiling: the most actors at once, all requested at
    the start (never more than shards).  ``min_actors``: fewer running for
    ``start_timeout_s`` while shards wait stops the job.  ``grows``: the
    ceiling was counted from the cluster (``actors: auto``) and is counted
    again as nodes join.
    """

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    min_actors: int = 1
    custom: dict = field(default_factory=dict)
    accelerator_type: str | None = None
    grows: bool = False
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S

    def needs(self) -> dict:
        """What one actor reserves, as Ray resource names and amounts."""
        out = {"CPU": self.cpus_per_actor}
        if self.gpus_per_actor:
            out["GPU"] = self.gpus_per_actor
        out.update(self.custom)
        if self.accelerator_type:
            out[ACCELERATOR_PREFIX + self.accelerator_type] = ACCELERATOR_SLIVER
        return out

    def kind(self) -> str:
        """The scarce resource that names the actors in messages: ``GPU`` in "4 GPU actors"."""
        if self.accelerator_type:
            return self.accelerator_type
        if self.custom:
            return next(iter(self.custom))
        return "GPU" if self.gpus_per_actor else "CPU"

    def describe(self) -> str:
        """What one actor needs, e.g. ``1 GPU + 1 CPU`` or ``tpu_slot: 1 + 1 CPU``."""
        parts = []
        for name, amount in self.needs().items():
            if name.startswith(ACCELERATOR_PREFIX):
                parts.append(f"a {name[len(ACCELERATOR_PREFIX):]} GPU")
            elif name in ("CPU", "GPU"):
                parts.append(f"{amount:g} {name}")
            else:
                parts.append(f"{name}: {amount:g}")
        return " + ".join(sorted(parts, key=lambda p: p.endswith(" CPU")))


def actor_bounds(spec_actors) -> tuple[int | None, int | None]:
    """(min, max) of ``resources.actors``; (None, None) for ``auto``."""
    if spec_actors == "auto":
        return None, None
    if isinstance(spec_actors, dict):
        return int(spec_actors.get("min", 1)), int(spec_actors["max"])
    return 1, int(spec_actors)


def fits(cluster: dict, needs: dict) -> int:
    """How many actors with ``needs`` the resources in ``cluster`` hold (ignoring how nodes split them)."""
    counts = [int(float(cluster.get(name, 0)) // amount) for name, amount in needs.items()
              if name != "CPU" and amount > 0]
    return min(counts) if counts else 0


def missing(needs: dict, nodes: list[dict]) -> list[str]:
    """The resources of ``needs`` that no alive node has enough of (what never appeared)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    return [name for name, amount in needs.items()
            if not any(float(r.get(name, 0)) >= amount for r in alive)]


def auto_count(cluster: dict, gpa: float, custom: dict) -> int:
    """``actors: auto``: one per GPU (or per custom-resource share), else one per CPU pair; at least 1."""
    gpu_or_custom = {k: v for k, v in {"GPU": gpa, **custom}.items() if v}
    if gpu_or_custom:
        return max(1, fits(cluster, gpu_or_custom))
    return max(1, int(float(cluster.get("CPU", 0)) // 2))


def plan(spec, cluster: dict, nodes: list[dict], n_shards: int, fixed: bool = True) -> Resources:
    """Actors, CPUs and GPUs per actor from the spec and the cluster (a pure function).

    Args:
        spec: the resolved job spec (its ``resources`` section is read).
        cluster: ``ray.cluster_resources()``.
        nodes: ``ray.nodes()``.
        n_shards: shards to do: never more actors than that.
        fixed: True when no node can join (the private local Ray): a request
            the cluster can never meet is refused; False: it waits for nodes.

    Returns:
        :class:`Resources`.

    Raises:
        AuditError: on a fixed cluster, actors that no node can hold.
    """
    res = spec.resources
    gpus = float(cluster.get("GPU", 0))
    gpa = res.gpus_per_actor
    gpa = (1.0 if gpus >= 1 else 0.0) if gpa == "auto" else float(gpa)
    custom = {str(k): float(v) for k, v in (res.custom or {}).items()}
    lo, hi = actor_bounds(res.actors)
    if hi is None:
        hi = auto_count(cluster, gpa, custom)
    hi = max(1, min(hi, max(1, n_shards)))
    lo = min(lo or 1, hi)
    cpa = res.cpus_per_actor
    if cpa == "auto":
        cpus = float(cluster.get("CPU", 0))
        cpa = 1.0 if (gpa > 0 or custom) else max(1.0, float(int(cpus // hi)) if cpus else 1.0)
        cpa = min(cpa, max(1.0, _largest_node_cpus(nodes, cpa)))  # an actor fits on one node
    out = Resources(actors=hi, cpus_per_actor=float(cpa), gpus_per_actor=gpa, min_actors=lo, custom=custom,
                    accelerator_type=res.accelerator_type, grows=res.actors == "auto",
                    start_timeout_s=float(res.start_timeout_s))
    if fixed:
        refuse_impossible(out, cluster, nodes)
    return out


def _largest_node_cpus(nodes: list[dict], default: float) -> float:
    return max((float(n.get("Resources", {}).get("CPU", 0)) for n in nodes if n.get("Alive")), default=default)


def refuse_impossible(res: Resources, cluster: dict, nodes: list[dict]) -> None:
    """On a cluster that cannot grow: one line for an actor no node can hold."""
    if res.gpus_per_actor > 0 and float(cluster.get("GPU", 0)) < res.gpus_per_actor:
        raise AuditError(f"resources.gpus_per_actor is {res.gpus_per_actor:g} but the cluster has "
                         f"{float(cluster.get('GPU', 0)):g} GPUs (and no node can join this private local Ray: "
                         "run on a cluster with --address to let an autoscaler add GPU nodes)")
    biggest = _largest_node_cpus(nodes, float(cluster.get("CPU", 0)))
    if res.cpus_per_actor > biggest:
        raise AuditError(f"resources.cpus_per_actor is {res.cpus_per_actor:g} but the largest node has "
                         f"{biggest:g} CPUs")
    absent = [k for k in missing(res.needs(), nodes) if k not in ("CPU", "GPU")]
    if absent:
        raise AuditError(f"resources: no node has {absent[0]!r} (this private local Ray has "
                         f"{', '.join(sorted(k for k in cluster if ':' not in k)) or 'nothing'}; "
                         "run on a cluster with --address to let an autoscaler add such nodes)")
