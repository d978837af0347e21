"""gateway/balancer.py: target selection and passive health, with a fake clock (no sockets, no loop)."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.balancer import Balancer, EjectionPolicy, Target

POLICY = EjectionPolicy(failures=3, ejection=30.0, max_ejection=300.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def balancer(*weights: int, least_request: bool = False, clock: FakeClock | None = None) -> Balancer:
    targets = [(f"http://10.0.0.{i}:8000", weight) for i, weight in enumerate(weights, start=1)]
    return Balancer(targets, POLICY, least_request=least_request, clock=clock or FakeClock())


def take(b: Balancer, count: int) -> list[int]:
    """The indexes of `count` picks, each released at once (round-robin does not look at in-flight)."""
    picks = []
    for _ in range(count):
        target = b.pick()
        assert target is not None
        b.release(target)
        picks.append(b.targets.index(target))
    return picks


def eject(b: Balancer, target: Target) -> float | None:
    seconds = None
    for _ in range(POLICY.failures):
        seconds = b.failed(target, target.epoch)
    return seconds


# --- smooth weighted round-robin -------------------------------------------------------------------------


def test_weights_interleave_as_nginx_does() -> None:
    # nginx's documented sequence for weights 5, 1, 1: a a b a c a a, not five a's in a row.
    assert take(balancer(5, 1, 1), 7) == [0, 0, 1, 0, 2, 0, 0]
    assert take(balancer(2, 1), 6) == [0, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (5, 1, 1), (2, 3, 7), (10, 1, 4, 4)])
def test_every_run_of_sum_of_weights_picks_each_target_exactly_weight_times(weights: tuple[int, ...]) -> None:
    b = balancer(*weights)
    total = sum(weights)
    for _ in range(5):  # every consecutive run, not only the first
        counts = Counter(take(b, total))
        assert [counts[i] for i in range(len(weights))] == list(weights)


def test_a_retry_goes_to_a_target_not_tried_yet() -> None:
    b = balancer(1, 1, 1)
    first = b.pick()
    assert first is not None
    second = b.pick([first])
    assert second is not None and second is not first
    third = b.pick([first, second])
    assert third is not None and third not in (first, second)


def test_a_retry_goes_back_to_a_tried_target_when_no_other_is_usable() -> None:
    clock = FakeClock()
    b = balancer(1, 1, clock=clock)
    a, other = b.targets
    eject(b, other)
    assert b.pick([a]) is a


def test_ejected_targets_do_not_take_turns_and_the_rest_keep_their_shares() -> None:
    b = balancer(2, 1, 1)
    eject(b, b.targets[2])
    counts = Counter(take(b, 30))
    assert counts == {0: 20, 1: 10}


# --- least_request -----------------------------------------------------------------------------------------


def test_least_request_prefers_the_target_with_fewer_requests_in_flight() -> None:
    b = balancer(1, 1, least_request=True)
    busy = b.pick()  # held: in flight until released
    idle = b.pick()
    assert busy is not None and idle is not None and idle is not busy
    b.release(idle)
    for _ in range(5):  # the idle one keeps winning while the busy one holds its request
        target = b.pick()
        assert target is idle
        b.release(target)
    b.release(busy)
    assert set(take(b, 2)) == {0, 1}  # both idle again: they take turns


def test_least_request_shares_ties_by_weight() -> None:
    b = balancer(3, 1, least_request=True)
    counts = Counter(take(b, 40))  # always released: every pick is a tie at 0 in flight
    assert counts == {0: 30, 1: 10}


def test_least_request_compares_requests_in_flight_per_unit_of_weight() -> None:
    # nginx's least_conn: weights 3 and 1 hold requests in flight 3 to 1, not 1 to 1.
    b = balancer(3, 1, least_request=True)
    for _ in range(8):
        b.pick()
    assert [t.in_flight for t in b.targets] == [6, 2]
    heavy, light = b.targets
    b.release(light)  # 6/3 against 1/1: the light one has less per unit of weight
    assert b.pick() is light
    b.release(heavy)  # 5/3 against 2/1
    assert b.pick() is heavy


def test_least_request_counts_each_request_until_it_is_released() -> None:
    b = balancer(1, 1, 1, least_request=True)
    held = [b.pick() for _ in range(6)]
    assert [t.in_flight for t in b.targets] == [2, 2, 2]
    for target in held:
        assert target is not None
        b.release(target)
    assert [t.in_flight for t in b.targets] == [0, 0, 0]


# --- passive health ----------------------------------------------------------------------------------------


def test_consecutive_failures_eject_a_target_and_a_response_resets_the_count() -> None:
    clock = FakeClock()
    b = balancer(1, 1, clock=clock)
    target = b.targets[1]
    assert b.failed(target, target.epoch) is None and b.failed(target, target.epoch) is None
    b.answered(target, target.epoch)  # not consecutive any more
    assert b.failed(target, target.epoch) is None and b.failed(target, target.epoch) is None
    assert not b.is_ejected(target)
    assert b.failed(target, target.epoch) == 30.0
    assert b.is_ejected(target) and b.ejected() == [target]
    assert set(take(b, 4)) == {0}


def test_the_ejection_ends_after_its_period() -> None:
    clock = FakeClock()
    b = balancer(1, 1, clock=clock)
    target = b.targets[1]
    eject(b, target)
    clock.now += 29.9
    assert b.is_ejected(target)
    clock.now += 0.1
    assert not b.is_ejected(target) and b.ejected() == []
    assert set(take(b, 2)) == {0, 1}


def test_back_off_doubles_up_to_the_cap_and_one_failure_ejects_a_returned_target() -> None:
    clock = FakeClock()
    b = balancer(1, 1, clock=clock)
    target = b.targets[0]
    assert eject(b, target) == 30.0
    durations = []
    for _ in range(6):
        clock.now = target.ejected_until  # back in rotation...
        durations.append(b.failed(target, target.epoch))  # ...and out again at its first failure
    assert durations == [60.0, 120.0, 240.0, 300.0, 300.0, 300.0]


def test_a_response_after_an_ejection_resets_the_back_off() -> None:
    clock = FakeClock()
    b = balancer(1, 1, clock=clock)
    target = b.targets[0]
    eject(b, target)
    clock.now = target.ejected_until
    assert b.failed(target, target.epoch) == 60.0
    clock.now = target.ejected_until
    b.answered(target, target.epoch)  # served well again
    # `failures` in a row again
    assert b.failed(target, target.epoch) is None and b.failed(target, target.epoch) is None
    assert b.failed(target, target.epoch) == 30.0  # and from the first period


def test_failures_of_requests_already_under_way_do_not_extend_an_ejection() -> None:
    clock = FakeClock()
    b = balancer(1, 1, clock=clock)
    target = b.targets[0]
    under_way = target.epoch  # picked before the ejection
    eject(b, target)
    until = target.ejected_until
    clock.now += 10
    assert b.failed(target, under_way) is None
    assert target.ejected_until == until and target.ejections == 1


def test_an_attempt_picked_before_an_ejection_does_not_eject_again_after_it_ended() -> None:
    """A 60 s response timeout outlives a 30 s ejection: the attempt tells of the target before it."""
    clock = FakeClock()
    b = balancer(1, 1, clock=clock)
    target = b.targets[0]
    under_way = target.epoch
    eject(b, target)
    clock.now += 45  # the ejection ended at +30
    assert not b.is_ejected(target)
    assert b.failed(target, under_way) is None
    assert not b.is_ejected(target) and target.failures == POLICY.failures
    b.answered(target, under_way)  # an answer from before the ejection resets nothing either
    assert target.ejections == 1
    picked = b.pick([b.targets[1]])
    assert picked is target
    assert b.failed(target, target.epoch) == 60.0  # an attempt picked after it: one failure, doubled


def test_every_target_ejected_leaves_nothing_to_pick_until_the_first_returns() -> None:
    clock = FakeClock()
    b = balancer(1, 1, clock=clock)
    first, second = b.targets
    eject(b, first)
    clock.now += 10
    eject(b, second)
    assert b.pick() is None and b.pick([first]) is None
    assert b.next_return() == pytest.approx(20.0)
    clock.now += 20
    assert b.next_return() == 0.0
    assert b.pick() is first


def test_a_pool_of_one_target_never_ejects_it() -> None:
    clock = FakeClock()
    b = balancer(1, clock=clock)
    [only] = b.targets
    for _ in range(10):
        assert b.failed(only, only.epoch) is None
    assert not b.is_ejected(only) and b.ejected() == []
    assert b.pick() is only and b.pick([only]) is only


def test_the_back_off_exponent_cannot_overflow() -> None:
    assert POLICY.duration(10_000) == 300.0
    assert POLICY.duration(0) == 30.0


def test_a_balancer_needs_a_target() -> None:
    with pytest.raises(ValueError):
        Balancer([], POLICY)
