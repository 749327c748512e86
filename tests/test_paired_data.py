"""Specification of the pairing sampler: which forget, retain and refusal examples each step reads.

The trainer-level pairing (batches, refusals, resuming) is specified in test_trainer.py.
"""

from __future__ import annotations

from grin_peft.paired_data import PairedSampler


def test_sampler_visits_each_forget_example_once_per_epoch_and_cycles_the_retain_set():
    sampler = PairedSampler(num_forget=7, num_retain=3, num_refusals=4, seed=0)
    orders, retain_stream = [], []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        triples = list(sampler)
        assert len(triples) == len(sampler) == 7  # the epoch follows the forget set
        assert sorted(f for f, _, _ in triples) == list(range(7))
        assert all(0 <= k < 4 for _, _, k in triples)
        orders.append([f for f, _, _ in triples])
        retain_stream += [r for _, r, _ in triples]
    assert len({tuple(order) for order in orders}) == 3  # reshuffled every epoch
    # Retain draws form one endless stream of reshuffled passes, continuing across epochs.
    passes = [retain_stream[i : i + 3] for i in range(0, 21, 3)]
    assert all(sorted(p) == [0, 1, 2] for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_sampler_retain_larger_than_forget_sees_every_retain_example_once_per_pass():
    sampler = PairedSampler(num_forget=3, num_retain=7, num_refusals=0, seed=1)
    stream = []
    for epoch in range(7):
        sampler.set_epoch(epoch)
        stream += [r for _, r, _ in sampler]
    assert [sorted(stream[i : i + 7]) for i in range(0, 21, 7)] == [list(range(7))] * 3


def test_sampler_is_a_pure_function_of_seed_and_epoch():
    """What makes resuming mid-epoch replay exactly the same pairs."""
    a, b = PairedSampler(9, 4, 3, seed=5), PairedSampler(9, 4, 3, seed=5)
    a.set_epoch(2)
    list(a)  # iterating does not advance any state
    b.set_epoch(2)
    assert list(a) == list(b)
    c = PairedSampler(9, 4, 3, seed=6)
    c.set_epoch(2)
    assert list(c) != list(a)


def test_sequential_sampler_pairs_in_order():
    sampler = PairedSampler(num_forget=5, num_retain=3, num_refusals=2, seed=0, shuffle=False)
    sampler.set_epoch(1)
    assert list(sampler) == [(i, (5 + i) % 3, (5 + i) % 2) for i in range(5)]
