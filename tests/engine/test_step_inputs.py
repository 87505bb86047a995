"""The step as the runner sees it: the scheduler's description of what changed, and the runner's
persistent per-sequence buffers (RequestSlots) kept equal to the scheduler's sequences from it alone."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine.request_slots import RequestSlots
from tests.engine.builders import make_scheduler, make_seq, run_step


def test_a_new_sequence_comes_with_all_its_tokens_and_blocks_then_only_what_grew():
    scheduler = make_scheduler(block_size=4)
    seq = make_seq(8)
    scheduler.add(seq)
    first = run_step(scheduler, next_token=7).inputs
    assert [new.request_id for new in first.new_seqs] == [seq.request_id] and first.running_seqs == []
    assert first.new_seqs[0].token_ids == seq.prompt_token_ids and first.new_seqs[0].block_ids == seq.block_table
    assert first.num_scheduled_tokens == [8] and first.sample_flags == [True]
    second = run_step(scheduler, next_token=8).inputs
    assert second.new_seqs == []
    (running,) = second.running_seqs
    assert running.new_token_ids == [7] and running.num_computed_tokens == 8
    assert running.new_block_ids == [seq.block_table[2]]  # position 8 starts a third block
    third = run_step(scheduler).inputs
    assert third.running_seqs[0].new_token_ids == [8] and third.running_seqs[0].new_block_ids == []


def test_a_preempted_sequence_is_released_then_readmitted_with_every_token():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    old, new = make_seq(8, max_tokens=3), make_seq(8)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # both prefill: 2 blocks each, the pool is full
    out = run_step(scheduler)  # both need a third block: the newest is preempted
    assert out.preempted_seqs == [new]
    assert out.inputs.released_ids == [new.request_id]
    assert [r.request_id for r in out.inputs.running_seqs] == [old.request_id]
    for _ in range(20):  # old finishes, then new is admitted again
        out = run_step(scheduler)
        if out.inputs.new_seqs:
            break
    (readmitted,) = out.inputs.new_seqs
    assert readmitted.token_ids == new.token_ids[: len(readmitted.token_ids)]
    assert len(readmitted.token_ids) > new.num_prompt_tokens  # its output so far is now part of the prompt
    assert readmitted.num_computed_tokens == 0


def test_finished_and_aborted_sequences_are_released_once():
    scheduler = make_scheduler()
    done, aborted = make_seq(4, max_tokens=1), make_seq(4)
    scheduler.add(done)
    scheduler.add(aborted)
    run_step(scheduler)  # done samples its one token and finishes
    scheduler.abort(aborted.request_id)
    out = run_step(scheduler)
    assert sorted(out.inputs.released_ids) == sorted([done.request_id, aborted.request_id])
    assert run_step(scheduler).inputs.released_ids == []


def test_sampling_rows_carry_token_lists_only_for_penalties():
    scheduler = make_scheduler()
    plain, penalized = make_seq(4), make_seq(4, repetition_penalty=1.5, frequency_penalty=0.5)
    scheduler.add(plain)
    scheduler.add(penalized)
    rows = run_step(scheduler, next_token=9).inputs.sampling
    assert rows[0].token_ids == [] and rows[0].output_token_ids == []
    assert rows[1].token_ids == penalized.token_ids[:4] and rows[1].output_token_ids == []
    rows = run_step(scheduler).inputs.sampling
    assert rows[1].output_token_ids == [9] and rows[1].params is penalized.params


def _check_slots_match(slots: RequestSlots, scheduler) -> None:
    for seq in scheduler.running:
        if seq.request_id not in slots._slot_of:
            continue  # admitted but never scheduled yet
        row = slots.slot(seq.request_id)
        held = slots._num_tokens[row]
        assert slots.token_ids[row, :held].tolist() == seq.token_ids[:held]
        assert held >= seq.num_computed_tokens
        blocks = slots.block_tables[row]
        assert blocks[: len(seq.block_table)].tolist() == seq.block_table
        assert not blocks[len(seq.block_table):].any()  # a reused row holds nothing of its last sequence


def test_slots_follow_the_scheduler_through_preemption_and_reuse():
    scheduler = make_scheduler(num_blocks=10, block_size=4, max_num_batched_tokens=12, max_num_seqs=3)
    slots = RequestSlots(max_num_seqs=3, max_model_len=64, block_size=4, device="cpu")
    for i in range(7):
        scheduler.add(make_seq(3 + 4 * i % 11, max_tokens=4 + i))
    num_steps = 0
    while scheduler.has_unfinished():
        out = run_step(scheduler, next_token=20 + num_steps)
        slots.update(out.inputs)
        if out.inputs.num_seqs:
            desc, host = slots.describe(out.inputs)
            assert host.cu_seqlens_q[-1] == sum(out.num_scheduled_tokens) == desc.num_tokens
            assert desc.slots.tolist() == [slots.slot(s.request_id) for s in out.scheduled_seqs]
        _check_slots_match(slots, scheduler)
        assert slots.num_used <= 3
        num_steps += 1
        assert num_steps < 500
    assert scheduler.num_preemptions > 0
    slots.update(scheduler.schedule().inputs)  # the last releases
    assert slots.num_used == 0


def test_slots_refuse_more_tokens_than_a_row_holds():
    scheduler = make_scheduler(max_model_len=64)
    slots = RequestSlots(max_num_seqs=2, max_model_len=8, block_size=4, device="cpu")
    scheduler.add(make_seq(9))
    with pytest.raises(ValueError, match="room for 8"):
        slots.update(scheduler.schedule().inputs)
    assert torch.equal(slots.token_ids, torch.zeros_like(slots.token_ids))
