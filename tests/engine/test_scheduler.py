from __future__ import annotations

from services.worker.engine.sequence import SequenceStatus
from tests.engine.builders import FakeClock, make_scheduler, make_seq, run_step


def test_token_budget_caps_each_step_and_chunks_the_prompt():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    long, short = make_seq(25), make_seq(3)
    scheduler.add(long)
    scheduler.add(short)
    out = run_step(scheduler)
    assert out.num_batched_tokens == 10
    assert out.scheduled_seqs == [long] and out.num_scheduled_tokens == [10]
    assert out.sample_flags == [False]
    assert scheduler.num_chunked_prefills == 1
    out = run_step(scheduler)
    assert out.num_scheduled_tokens == [10]
    out = run_step(scheduler)  # long's last 5, then short fits in what is left
    assert out.scheduled_seqs == [long, short] and out.num_scheduled_tokens == [5, 3]
    assert out.sampled_seqs == [long, short]


def test_running_sequences_decode_before_waiting_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    first = make_seq(8)
    scheduler.add(first)
    run_step(scheduler)
    late = make_seq(20)
    scheduler.add(late)
    out = run_step(scheduler)
    assert out.scheduled_seqs == [first, late] and out.num_scheduled_tokens == [1, 7]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    scheduler = make_scheduler(max_num_batched_tokens=10, chunked_prefill=False)
    a, b = make_seq(6), make_seq(6)
    scheduler.add(a)
    scheduler.add(b)
    out = run_step(scheduler)
    assert out.scheduled_seqs == [a]
    assert scheduler.num_chunked_prefills == 0


def test_max_num_seqs_limits_running():
    scheduler = make_scheduler(max_num_seqs=2)
    for _ in range(3):
        scheduler.add(make_seq(4))
    run_step(scheduler)
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 1


def test_priority_orders_admission():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    low, high = make_seq(4, priority=5), make_seq(4, priority=-1)
    scheduler.add(low)
    scheduler.add(high)
    out = run_step(scheduler)
    assert out.scheduled_seqs == [high]


def test_preempts_newest_when_blocks_run_out():
    # 4 blocks of 4 tokens: two 8-token prompts fill the pool; the next decode needs a fifth block.
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    old, new = make_seq(8), make_seq(8)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)
    assert scheduler.kv_cache.num_free_blocks == 0
    out = run_step(scheduler)
    assert out.preempted_seqs == [new]
    assert out.scheduled_seqs == [old]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert scheduler.num_preemptions == 1
    # Its prompt and sampled token are all to be recomputed, as one prompt.
    assert new.num_uncomputed_tokens == 9


def test_preempts_lowest_priority_before_newest():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    background, urgent = make_seq(8, priority=1), make_seq(8, priority=0)
    scheduler.add(background)
    scheduler.add(urgent)
    run_step(scheduler)
    out = run_step(scheduler)
    assert out.preempted_seqs == [background]


def test_preempted_sequence_resumes_and_keeps_its_tokens():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    old, new = make_seq(8, max_tokens=2), make_seq(8, max_tokens=2)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler, next_token=7)
    run_step(scheduler, next_token=8)  # old finishes (2 tokens), new preempted
    assert old.is_finished and old.output_token_ids == [7, 8]
    out = run_step(scheduler, next_token=9)
    assert out.scheduled_seqs == [new] and out.num_scheduled_tokens == [9]
    assert new.is_finished and new.output_token_ids == [7, 9]


def test_cancellation_frees_blocks_within_one_step():
    scheduler = make_scheduler()
    seq = make_seq(10)
    scheduler.add(seq)
    run_step(scheduler)
    assert scheduler.kv_cache.num_used_blocks == 3
    scheduler.abort(seq.request_id)
    out = scheduler.schedule()
    assert out.finished_seqs == [seq] and out.scheduled_seqs == []
    assert seq.finish_reason.value == "abort"
    assert scheduler.kv_cache.num_used_blocks == 0
    assert not scheduler.has_unfinished()


def test_cancelling_a_waiting_request_finishes_it():
    scheduler = make_scheduler(max_num_seqs=1)
    running, waiting = make_seq(4), make_seq(4)
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)
    scheduler.abort(waiting.request_id)
    out = scheduler.schedule()
    assert out.finished_seqs == [waiting] and scheduler.waiting == []


def test_deadline_finishes_running_and_waiting_sequences():
    clock = FakeClock()
    scheduler = make_scheduler(max_num_seqs=1, clock=clock)
    a, b, patient = make_seq(4, deadline_s=5.0), make_seq(4, deadline_s=5.0), make_seq(4)
    for seq in (a, b, patient):
        scheduler.add(seq)
    run_step(scheduler)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    clock.now = 5.0
    out = scheduler.schedule()
    assert set(out.finished_seqs) == {a, b}
    assert {s.finish_reason.value for s in out.finished_seqs} == {"deadline"}
    assert out.scheduled_seqs == [patient]
    assert scheduler.kv_cache.num_used_blocks == 1


def test_stops_on_eos_stop_token_and_max_tokens():
    scheduler = make_scheduler()
    eos, stop, length = make_seq(4), make_seq(4, stop_token_ids=[9]), make_seq(4, max_tokens=1)
    ignoring = make_seq(4, ignore_eos=True)
    for seq in (eos, stop, length, ignoring):
        scheduler.add(seq)
    out = scheduler.schedule()
    finished = scheduler.update(out, [2, 9, 5, 2])
    assert finished == [eos, stop, length]
    assert [s.finish_reason.value for s in finished] == ["stop", "stop", "length"]
    assert not ignoring.is_finished


def test_max_model_len_ends_a_sequence():
    scheduler = make_scheduler(max_model_len=6)
    seq = make_seq(5)
    scheduler.add(seq)
    run_step(scheduler)
    assert seq.finish_reason.value == "length" and seq.num_tokens == 6


def test_prefix_cache_hit_skips_computed_tokens():
    scheduler = make_scheduler(prefix_caching=True)
    first = make_seq(tokens=list(range(10, 22)))
    scheduler.add(first)
    run_step(scheduler)
    second = make_seq(tokens=list(range(10, 22)) + [5])
    scheduler.add(second)
    out = run_step(scheduler)
    assert out.scheduled_seqs == [first, second]
    assert out.num_scheduled_tokens == [1, 1]  # 12 prompt tokens found in 3 cached blocks
    assert second.num_cached_tokens == 12
    assert scheduler.kv_cache.num_hit_tokens == 12


def test_better_priority_preempts_a_running_sequence_for_a_seat():
    scheduler = make_scheduler(max_num_seqs=1)
    background = make_seq(4, priority=1)
    scheduler.add(background)
    run_step(scheduler)
    urgent = make_seq(4, priority=0)
    scheduler.add(urgent)
    out = run_step(scheduler)
    assert out.preempted_seqs == [background] and out.scheduled_seqs == [urgent]
    assert background.status is SequenceStatus.WAITING and background.block_table == []
    assert scheduler.num_priority_preemptions == scheduler.num_preemptions == 1


def test_better_priority_preempts_a_running_sequence_for_blocks():
    # 4 blocks of 4: background holds 3; urgent's 8 tokens need 2.
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    background = make_seq(12, priority=1)
    scheduler.add(background)
    run_step(scheduler)
    urgent = make_seq(8, priority=0)
    scheduler.add(urgent)
    out = run_step(scheduler)
    assert out.preempted_seqs == [background] and out.scheduled_seqs == [urgent]
    assert scheduler.kv_cache.num_used_blocks == 2


def test_equal_priority_waits_for_a_seat_rather_than_preempting():
    scheduler = make_scheduler(max_num_seqs=1)
    first, second = make_seq(4), make_seq(4)
    scheduler.add(first)
    run_step(scheduler)
    scheduler.add(second)
    out = run_step(scheduler)
    assert out.preempted_seqs == [] and out.scheduled_seqs == [first]
