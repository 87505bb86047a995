"""Routing policies choose replicas as specified: in turn, by two random choices on load, by cached
prefix against load with a guard against piling onto one replica, and by session key."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

from protos.tensoryard.v1 import worker_pb2
from services.router.kv_index import KvIndex
from services.router.load import ReplicaLoad
from services.router.policies import KvAware, LeastLoad, LoadGuard, RoundRobin, RouteRequest, make_policy


@dataclass(eq=False)
class FakeReplica:
    instance_id: str
    load: ReplicaLoad = field(default_factory=ReplicaLoad)


def replica(name: str, running: int = 0, waiting: int = 0, used_blocks: int = 0, seats: int = 64) -> FakeReplica:
    load = ReplicaLoad()
    load.on_report(worker_pb2.WorkerStats(state="SERVING", num_running=running, num_waiting=waiting,
                                          num_kv_blocks_used=used_blocks, max_num_seqs=seats), now_s=0.0)
    return FakeReplica(name, load)


HASHES = [bytes([i]) * 32 for i in range(10)]


def test_round_robin_takes_each_replica_in_turn():
    replicas = [replica("a"), replica("b"), replica("c")]
    policy = RoundRobin()
    chosen = [policy.choose(RouteRequest("m"), replicas).instance_id for _ in range(6)]
    assert chosen == ["a", "b", "c", "a", "b", "c"]


def test_least_load_picks_the_less_loaded_of_two_random_replicas():
    random.seed(1)
    replicas = [replica("idle"), replica("busy", running=20), replica("busier", running=40)]
    counts = collections.Counter(LeastLoad().choose(RouteRequest("m"), replicas).instance_id for _ in range(300))
    assert counts["busier"] == 0  # it always loses its pair
    assert counts["idle"] > counts["busy"]


def test_kv_aware_prefers_the_replica_holding_the_prefix():
    index = KvIndex()
    index.apply_events("warm", HASHES, [], snapshot=True)
    replicas = [replica("cold", used_blocks=10), replica("warm", used_blocks=20)]
    policy = KvAware(index, overlap_weight=4.0)
    assert policy.choose(RouteRequest("m", block_hashes=HASHES), replicas).instance_id == "warm"


def test_kv_aware_goes_elsewhere_when_the_load_outweighs_the_prefix():
    index = KvIndex()
    index.apply_events("warm", HASHES[:2], [], snapshot=True)  # 2 of 10 blocks cached there
    replicas = [replica("cold", used_blocks=10), replica("warm", used_blocks=60)]
    policy = KvAware(index, overlap_weight=4.0)
    # warm: 4 * 8 + 60 = 92; cold: 4 * 10 + 10 = 50
    assert policy.choose(RouteRequest("m", block_hashes=HASHES), replicas).instance_id == "cold"


def test_the_load_guard_overrides_the_prefix_when_one_replica_is_far_busier():
    index = KvIndex()
    index.apply_events("hot", HASHES, [], snapshot=True)
    policy = KvAware(index, overlap_weight=1000.0, guard=LoadGuard(abs_occupancy=0.5, ratio=2.0))
    # Four seats each: all four taken on the replica holding the prefix, none on the other.
    piled = [replica("hot", running=4, seats=4), replica("other", seats=4)]
    assert policy.choose(RouteRequest("m", block_hashes=HASHES), piled).instance_id == "other"
    within = [replica("hot", running=3, seats=4), replica("other", running=1, seats=4)]  # 0.5 apart
    assert policy.choose(RouteRequest("m", block_hashes=HASHES), within).instance_id == "hot"
    many_seats = [replica("hot", running=20), replica("other", running=5)]  # of 64: 0.23 apart
    assert policy.choose(RouteRequest("m", block_hashes=HASHES), many_seats).instance_id == "hot"


def test_kv_aware_without_prompt_blocks_routes_by_load():
    random.seed(2)
    replicas = [replica("idle"), replica("busy", running=30)]
    policy = KvAware(KvIndex())
    assert {policy.choose(RouteRequest("m"), replicas).instance_id for _ in range(20)} == {"idle"}


def test_a_softmax_temperature_spreads_choices_by_cost():
    random.seed(3)
    index = KvIndex()
    index.apply_events("warm", HASHES, [], snapshot=True)
    replicas = [replica("cold"), replica("warm")]
    policy = KvAware(index, overlap_weight=1.0, temperature=1.0)
    counts = collections.Counter(policy.choose(RouteRequest("m", block_hashes=HASHES), replicas).instance_id
                                 for _ in range(500))
    assert counts["warm"] > counts["cold"] > 0


def test_a_session_key_sticks_to_one_replica_whatever_the_load_within_the_guard():
    replicas = [replica("a", running=3), replica("b"), replica("c", running=1)]
    policy = make_policy("least_load", KvIndex())
    chosen = {policy.choose(RouteRequest("m", session_key="user-7"), replicas).instance_id for _ in range(20)}
    assert len(chosen) == 1
    keys = collections.Counter(policy.choose(RouteRequest("m", session_key=f"user-{i}"), replicas).instance_id
                               for i in range(300))
    assert len(keys) == 3  # different keys spread over the replicas


def test_a_session_replica_far_over_the_guard_gives_way():
    replicas = [replica("a"), replica("b")]
    policy = make_policy("least_load", KvIndex(), guard=LoadGuard(abs_occupancy=0.5, ratio=2.0))
    sticky = policy.choose(RouteRequest("m", session_key="s"), replicas).instance_id
    overloaded = [replica(r.instance_id, running=60 if r.instance_id == sticky else 1) for r in replicas]
    assert policy.choose(RouteRequest("m", session_key="s"), overloaded).instance_id != sticky


def test_requests_routed_since_the_last_report_count_as_load():
    load = ReplicaLoad()
    load.on_report(worker_pb2.WorkerStats(state="SERVING", num_running=2, max_num_seqs=8), now_s=0.0)
    load.on_routed(num_prompt_blocks=5)
    load.on_routed(num_prompt_blocks=5)
    assert load.num_requests == 4
    assert load.num_active_blocks == 10
    load.on_report(worker_pb2.WorkerStats(state="SERVING", num_running=4, max_num_seqs=8), now_s=1.0)
    assert load.num_requests == 4


def test_requests_that_ended_since_the_last_report_no_longer_count():
    load = ReplicaLoad()
    load.on_report(worker_pb2.WorkerStats(state="SERVING", num_running=4, max_num_seqs=4), now_s=0.0)
    load.on_sent()
    load.on_ended()  # one of the four this router sent there finished before the next report
    assert load.num_requests == 3
    load.on_routed()
    load.on_sent()  # its caller's next request takes the freed seat
    assert load.num_requests == 4 and load.num_outstanding == 1
    load.on_report(worker_pb2.WorkerStats(state="SERVING", num_running=0, max_num_seqs=4), now_s=0.1)
    load.on_ended()  # an end that reaches the router just after the report that left it out
    assert load.num_requests == 0


def test_a_replica_is_routable_while_it_reports_serving_and_on_time():
    load = ReplicaLoad(added_at_s=0.0)
    assert load.routable(now_s=0.5, stale_after_s=1.0)  # connecting
    assert not load.routable(now_s=1.5, stale_after_s=1.0)  # never reported
    load.on_report(worker_pb2.WorkerStats(state="SERVING"), now_s=2.0)
    assert load.routable(now_s=2.5, stale_after_s=1.0)
    assert not load.routable(now_s=3.5, stale_after_s=1.0)  # silent: stopped or hung process
    load.on_report(worker_pb2.WorkerStats(state="DRAINING"), now_s=4.0)
    assert not load.routable(now_s=4.1, stale_after_s=1.0)


def test_a_replica_past_its_own_wait_bound_is_saturated():
    load = ReplicaLoad()
    load.on_report(worker_pb2.WorkerStats(state="SERVING", estimated_queue_wait_s=0.5, queue_wait_bound_s=0.2), 0.0)
    assert load.saturated and abs(load.retry_after_s - 0.3) < 1e-6
    load.on_report(worker_pb2.WorkerStats(state="SERVING", estimated_queue_wait_s=0.1, queue_wait_bound_s=0.2), 0.1)
    assert not load.saturated


def test_a_full_replica_where_a_request_just_ended_has_room_until_it_is_taken():
    """At capacity, the report that says 'full' may be a step old: the seat a request just freed is
    there for the next request, not a reason to refuse it."""
    load = ReplicaLoad()
    load.on_report(worker_pb2.WorkerStats(state="SERVING", estimated_queue_wait_s=0.5, queue_wait_bound_s=0.2), 0.0)
    load.on_sent()
    load.on_ended()
    assert not load.saturated
    load.on_routed()  # the freed seat is taken
    assert load.saturated


def test_a_refusal_since_the_report_says_the_freed_seat_is_taken():
    load = ReplicaLoad()
    full = worker_pb2.WorkerStats(state="SERVING", estimated_queue_wait_s=0.5, queue_wait_bound_s=0.2)
    load.on_report(full, 0.0)
    load.on_sent()
    load.on_ended()  # a seat freed: room, as above ...
    assert not load.saturated
    load.on_routed()
    load.on_sent()
    load.on_ended()
    load.on_refused()  # ... until the replica refuses one: someone else's request took it
    assert load.saturated
    load.on_report(worker_pb2.WorkerStats(state="SERVING", estimated_queue_wait_s=0.1, queue_wait_bound_s=0.2), 0.1)
    assert not load.saturated  # a fresh report decides again


def test_each_running_sequence_counts_its_whole_context_so_a_hot_prefix_spreads_out():
    index = KvIndex()
    index.apply_events("hot", HASHES, [], snapshot=True)  # a 10-block prefix, cached on one replica
    policy = KvAware(index, overlap_weight=4.0)

    def hot_with(num_sequences: int) -> FakeReplica:
        load = ReplicaLoad()
        # Each sequence: the shared prefix and two blocks of its own, 12 blocks of 16 tokens.
        load.on_report(worker_pb2.WorkerStats(state="SERVING", num_running=num_sequences, max_num_seqs=64,
                                              num_kv_blocks_used=10 + 2 * num_sequences,
                                              num_context_tokens=num_sequences * 12 * 16), now_s=0.0)
        return FakeReplica("hot", load)

    request = RouteRequest("m", block_hashes=HASHES)
    assert policy.choose(request, [hot_with(2), replica("cold")]).instance_id == "hot"  # 24 < 40
    assert policy.choose(request, [hot_with(4), replica("cold")]).instance_id == "cold"  # 48 > 40
