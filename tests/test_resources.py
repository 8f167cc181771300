"""Whether a cluster can ever run a node, and the one line that says why not."""

from __future__ import annotations

from pipeline.resources import GiB, NodeResources, Worker, shortfall, unplaceable

CPU_ONLY = Worker("10.0.0.2/aa", {"CPU": 8.0, "memory": 20 * GiB, "node:10.0.0.2": 1.0, "object_store_memory": 1e9})
ADA = Worker("10.0.0.3/bb", {"CPU": 4.0, "memory": 12 * GiB, "sm_89": 1.0})


def test_a_node_fits_a_worker_with_enough_of_everything() -> None:
    need = NodeResources(cpus=1, memory_bytes=8 * GiB)
    assert shortfall(need, CPU_ONLY) == [] and shortfall(need, ADA) == []
    assert unplaceable("export_decoder", need, [CPU_ONLY, ADA]) is None
    assert shortfall(NodeResources(custom=(("sm_89", 1.0),)), CPU_ONLY) == ["sm_89"]


def test_missing_hardware_is_named_with_what_the_cluster_offers() -> None:
    msg = unplaceable("engine@h100", NodeResources(custom=(("sm_90", 1.0),)), [CPU_ONLY, ADA])
    assert msg == ("engine@h100 needs a worker with sm_90; the cluster offers: 10.0.0.2/aa (8 CPU, 20.0 GiB); "
                   "10.0.0.3/bb (4 CPU, 12.0 GiB, sm_89)")


def test_memory_no_single_worker_has_fails_even_if_the_cluster_has_it_in_total() -> None:
    need = NodeResources(cpus=1, memory_bytes=24 * GiB, basis="0.75 x 31 GiB of weights")
    msg = unplaceable("export_decoder", need, [CPU_ONLY, ADA])  # 32 GiB in all, 20 at most on one
    assert msg is not None and msg.startswith("export_decoder needs one worker with 1 CPU and 24.0 GiB of memory "
                                              "(0.75 x 31 GiB of weights); the cluster offers: ")


def test_the_right_hardware_on_too_small_a_worker_names_the_whole_need() -> None:
    need = NodeResources(cpus=1, memory_bytes=16 * GiB, custom=(("sm_89", 1.0),))
    msg = unplaceable("engine@l4", need, [CPU_ONLY, ADA])
    assert msg is not None and "needs one worker with 1 CPU and 16.0 GiB of memory and sm_89" in msg


def test_no_workers_at_all() -> None:
    assert unplaceable("source", NodeResources(), []) == "source needs one worker with 1 CPU; the cluster offers: no workers"

