"""What a node needs from the machine that runs it, and whether a cluster offers it.

A stage declares ``resources(cfg, target) -> NodeResources``; the planner evaluates it per node,
``vlmforge plan --json`` prints it (for any scheduler: Ray here, Slurm or Kubernetes jobs from
the JSON), and the Ray executor reserves it. Custom resources name hardware a worker advertises
(``ray start --resources '{"sm_90": 1}'``): the spine knows no hardware, only names and amounts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GiB = 1 << 30


@dataclass(frozen=True)
class NodeResources:
    cpus: float = 1.0
    memory_bytes: int = 0  # the node's expected peak resident memory (0: no reservation)
    custom: tuple[tuple[str, float], ...] = ()  # e.g. (("sm_90", 1.0),): hardware a worker must offer
    basis: str = ""  # how memory_bytes was estimated, for the plan and the failure message

    def as_dict(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory_bytes": self.memory_bytes, "custom": dict(self.custom), "basis": self.basis}

    def needs(self) -> dict[str, float]:
        """In Ray's resource vocabulary (``CPU``, ``memory`` in bytes, custom names)."""
        out = {"CPU": float(self.cpus), **dict(self.custom)}
        if self.memory_bytes:
            out["memory"] = float(self.memory_bytes)
        return out


DEFAULT = NodeResources()


@dataclass(frozen=True)
class Worker:
    """One machine of a cluster as the scheduler sees it: an id and its total resources."""

    name: str
    resources: Mapping[str, float] = field(default_factory=dict)


def shortfall(needs: NodeResources, worker: Worker) -> list[str]:
    """What ``worker`` lacks to run a node with ``needs`` (empty: it fits)."""
    have = worker.resources
    out = []
    for name, amount in needs.needs().items():
        if have.get(name, 0.0) + 1e-9 < amount:
            out.append(name)
    return out


def _offer(w: Worker) -> str:
    parts = [f"{w.resources.get('CPU', 0):g} CPU", f"{w.resources.get('memory', 0) / GiB:.1f} GiB"]
    parts += [f"{k}" for k in sorted(custom_names(w.resources))]
    return f"{w.name} ({', '.join(parts)})"


def custom_names(resources: Mapping[str, float]) -> list[str]:
    """A worker's hardware names: Ray's own bookkeeping resources left out."""
    builtin = {"CPU", "GPU", "memory", "object_store_memory"}
    return [k for k in resources if k not in builtin and not k.startswith(("node:", "accelerator_type:"))]


def unplaceable(node_id: str, needs: NodeResources, workers: Iterable[Worker]) -> str | None:
    """One line when no worker can ever run this node (it would queue forever), else None."""
    workers = list(workers)
    if any(not shortfall(needs, w) for w in workers):
        return None
    custom = [k for k, _ in needs.custom]
    missing_custom = [k for k in custom if not any(w.resources.get(k, 0.0) for w in workers)]
    offers = "; ".join(_offer(w) for w in workers) or "no workers"
    if missing_custom:
        return f"{node_id} needs a worker with {', '.join(missing_custom)}; the cluster offers: {offers}"
    want = [f"{needs.cpus:g} CPU"] + ([f"{needs.memory_bytes / GiB:.1f} GiB of memory"] if needs.memory_bytes else [])
    want += custom
    basis = f" ({needs.basis})" if needs.basis else ""
    return f"{node_id} needs one worker with {' and '.join(want)}{basis}; the cluster offers: {offers}"
