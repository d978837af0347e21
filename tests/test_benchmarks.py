"""The benchmark harness (`make bench`, `python -m benchmarks`): its command line, and how `--rounds`
orders and combines runs (pure, no servers)."""

from __future__ import annotations

import contextlib
import json
import types

import pytest

from benchmarks import harness, rounds
from benchmarks.load import LoadResult


def test_help_lists_every_target(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Target names carry "%" (full+tracing1%), which argparse would take for a format directive.
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as exited:
        harness.parse_args(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out.split()
    for name in [*harness.FIXED_TARGETS, *(s.name for s in harness.SCENARIOS)]:
        assert name in out or f"{name}," in out


def test_only_takes_the_tracing_scenarios_in_the_fixed_order() -> None:
    args = harness.parse_args(["--only", "full-propagation,full+tracing1%,gateway+jwt+ratelimit"])
    assert args.only == ["gateway+jwt+ratelimit", "full+tracing1%", "full-propagation"]


def test_an_unknown_target_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        harness.parse_args(["--only", "full"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unknown target(s) full;" in err
    assert "full+tracing1%" in err


def test_rounds_alternate_the_order():
    assert rounds.orders(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]


def test_the_middle_run_is_a_real_one():
    runs = [("r1", 5100.0), ("r2", 4000.0), ("r3", 4800.0), ("r4", 3900.0)]
    assert rounds.middle(runs[:3], key=lambda run: run[1]) == ("r3", 4800.0)
    assert rounds.middle(runs, key=lambda run: run[1]) == ("r2", 4000.0)  # the lower middle


def test_ratios_are_the_median_of_each_rounds_own():
    # The box slowed down in round 2 for both sides: within-round ratios stay steady.
    per_round = [
        {"b/a": {"rps": 0.97, "p99": 1.1, "cpu_us_added": 6.0}},
        {"b/a": {"rps": 0.99, "p99": 1.3, "cpu_us_added": 9.0}, "c/a": {"rps": 0.5, "p99": 2.0}},
        {"b/a": {"rps": 0.90, "p99": 1.2}},
    ]
    combined = rounds.combine(per_round)
    assert combined["b/a"] == {"rps": 0.97, "p99": 1.2, "rps_min": 0.90, "rps_max": 0.99, "rounds": 3}
    assert combined["c/a"] == {"rps": 0.5, "p99": 2.0, "rps_min": 0.5, "rps_max": 0.5, "rounds": 1}


def test_rounds_and_breakdown_do_not_mix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        harness.parse_args(["--rounds", "3", "--breakdown"])
    assert exited.value.code == 2
    assert "--rounds" in capsys.readouterr().err


def test_summary_rows_take_each_targets_middle_round():
    def row(target: str, rps: float) -> harness.Row:
        result = LoadResult(tool="wrk", requests=1000, seconds=1.0, rps=rps, p50_ms=1.0, p99_ms=2.0, errors=0)
        return harness.Row(target, result, cpu_us=1e6 / rps)

    runs = [
        [row("a", 100.0), row("b", 90.0)],
        [row("b", 70.0), harness.Row("a", error="did not start")],
        [row("a", 120.0), row("b", 80.0)],
    ]
    summary = harness.summary_rows(["a", "b", "c"], runs)
    assert [(r.target, r.result.rps if r.result else None) for r in summary] == [("a", 100.0), ("b", 80.0)]


def test_rounds_measure_each_target_once_per_round(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    # Real servers on loopback (the upstream, a Redis, the gateway), a short load each: each round starts
    # its own, so nothing of one round (a Redis directory, a log) stands in the way of the next.
    out = tmp_path / "bench.json"
    load = ["--tool", "python", "-d", "0.3", "--warmup", "0", "--max-requests", "200"]
    assert harness.main(["--rounds", "2", "--only", "gateway+jwt+ratelimit", *load, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["rounds"] == 2
    assert [[run["target"] for run in one] for one in doc["rounds"]] == [["gateway+jwt+ratelimit"]] * 2
    assert all(run["requests"] > 0 and run["errors"] == 0 for one in doc["rounds"] for run in one)
    (summary,) = doc["results"]
    assert summary["requests"] in {run["requests"] for one in doc["rounds"] for run in one}
    assert "over 2 rounds" in capsys.readouterr().out


def test_main_alternates_the_order_and_combines_each_rounds_own_ratios(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No servers: the wiring of main() around what it measures. The box "slows down" in round 3 for the
    # plain gateway only, so the median of the rounds' ratios (0.7) differs from the ratio of the middle
    # rows (90/100).
    measured: list[str] = []
    rps = iter([100.0, 90.0, 70.0, 100.0, 200.0, 100.0])

    def fake_measure(args, tool, name, target, during=None) -> harness.Row:
        measured.append(name)
        result = LoadResult(tool, requests=100, seconds=1.0, rps=next(rps), p50_ms=1.0, p99_ms=2.0, errors=0)
        return harness.Row(name, result, cpu_us=100.0)

    @contextlib.contextmanager
    def no_server(*args, **kwargs):
        yield types.SimpleNamespace(pid=0)

    monkeypatch.setattr(harness, "server", no_server)
    monkeypatch.setattr(harness, "start_target", lambda *args: None)
    monkeypatch.setattr(harness, "measure", fake_measure)
    out = tmp_path / "bench.json"
    argv = ["--rounds", "3", "--only", "gateway+jwt,gateway", "--tool", "python", "--json", str(out)]
    assert harness.main(argv) == 0
    first, second = ["gateway", "gateway+jwt"], ["gateway+jwt", "gateway"]
    assert measured == [*first, *second, *first]
    ratio = json.loads(out.read_text())["ratios"]["gateway+jwt/gateway"]
    assert (ratio["rps"], ratio["rps_min"], ratio["rps_max"], ratio["rounds"]) == (0.7, 0.5, 0.9, 3)
    assert "gateway+jwt/gateway: req/s x0.70 [median of 3 round(s); x0.50..x0.90]" in capsys.readouterr().out


def test_rounds_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        harness.parse_args(["--rounds", "0"])
    assert exited.value.code == 2
    assert "--rounds must be positive" in capsys.readouterr().err
