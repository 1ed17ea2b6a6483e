"""The benchmarks' one timer: warm-up calls are untimed, CUDA is synchronised around every timed call."""
import pytest

from dspo_basicsr.bench import timer


@pytest.fixture
def clock(monkeypatch):
    """A fake ``perf_counter`` that each call of the timed function advances by a chosen duration."""
    state = {'now': 0.0, 'syncs': []}
    monkeypatch.setattr(timer.time, 'perf_counter', lambda: state['now'])
    monkeypatch.setattr(timer.torch.cuda, 'synchronize', lambda device=None: state['syncs'].append(device))
    return state


def advancing(clock, durations):
    calls = []

    def fn():
        clock['now'] += durations[len(calls)]
        calls.append(len(calls))
    return fn, calls


def test_timed_skips_warmup_and_reports_median_and_min(clock):
    fn, calls = advancing(clock, [100.0, 3.0, 1.0, 2.0, 9.0])
    timing = timer.timed(fn, repeats=4, warmup=1)
    assert len(calls) == 5
    assert timing.times == [3.0, 1.0, 2.0, 9.0]      # the 100 s warm-up call is not among them
    assert timing.median == 2.5 and timing.min == 1.0
    assert clock['syncs'] == []                      # no device: nothing to synchronise


def test_cuda_device_is_synchronised_around_each_timed_call(clock):
    fn, _ = advancing(clock, [1.0] * 4)
    timer.timed(fn, repeats=2, device='cuda', warmup=1)
    assert len(clock['syncs']) == 4                  # before and after each of the 2 timed calls
    timer.time_call(fn, device='cpu')
    assert len(clock['syncs']) == 4


def test_side_by_side_alternates_the_two_calls(clock):
    order = []

    def a():
        order.append('a')
        clock['now'] += 1.0

    def b():
        order.append('b')
        clock['now'] += 4.0
    timing_a, timing_b = timer.timed_side_by_side(a, b, repeats=3, warmup=1)
    assert order == ['a', 'b'] * 4
    assert timing_a.times == [1.0] * 3 and timing_b.times == [4.0] * 3


def test_no_repeats_is_an_error():
    with pytest.raises(ValueError, match='repeats'):
        timer.timed(lambda: None, repeats=0)
