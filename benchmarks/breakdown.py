"""`--breakdown SCENARIO`: where the gateway's CPU per request goes, stage by stage.

py-spy samples the gateway process (from outside, `--nonblocking`: the gateway is not paused) while the
harness loads it as in a normal run. Each sample's stack is given to one stage by the module of its innermost
frame that STAGES knows (so JSON encoding called from the access log counts as access log), and the gateway's
measured CPU µs per request is shared out in proportion to the samples. Sharing out the measured CPU rather
than multiplying samples by the sampling interval keeps the figures honest when py-spy falls behind or
misses a sample: only the proportions come from the profiler.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LOOP = "event loop"
OTHER = "other"
# (path prefix as py-spy prints it, stage). The longest matching prefix of a frame's file wins. Paths are
# matched on whole components from the start, or after any "/" (site-packages, stdlib and the checkout all
# show up). Add a line when a module moves: the upstream client is matched by package, so a new file under
# gateway/proxy/ needs nothing.
STAGES: tuple[tuple[str, str], ...] = (
    ("gateway/proxy/", "upstream client"),
    ("aiohttp/client", "upstream client"),  # client.py, client_reqrep.py, client_proto.py, ...
    ("aiohttp/connector", "upstream client"),
    ("httptools/", "upstream client"),
    ("gateway/ratelimit/", "rate limiting"),
    ("gateway/filters/ratelimit", "rate limiting"),
    ("gateway/redis_client", "rate limiting"),
    ("redis/", "rate limiting"),
    ("aiohttp/web_protocol", "server"),
    ("aiohttp/web_response", "server"),
    ("aiohttp/web_request", "server"),
    ("aiohttp/web_server", "server"),
    ("aiohttp/base_protocol", "server"),
    ("gateway/http_edge", "server"),
    ("gateway/http_conformance", "server"),
    ("gateway/app", "filter chain"),
    ("gateway/pipeline", "filter chain"),
    ("gateway/filters/", "filter chain"),
    ("gateway/context", "filter chain"),
    ("gateway/routing", "filter chain"),
    ("gateway/request_id", "filter chain"),
    ("gateway/envelope", "filter chain"),
    ("gateway/forwarding", "header copying"),
    ("gateway/auth/", "JWT"),
    ("gateway/filters/auth", "JWT"),
    ("jwt/", "JWT"),
    ("cryptography/", "JWT"),
    ("gateway/observability/", "metrics"),
    ("prometheus_client/", "metrics"),
    ("gateway/logs", "access log"),
    ("structlog/", "access log"),
    ("logging/", "access log"),
)
# Modules that serve more than one stage: they decide only when no frame further out is in STAGES. The
# client writes its request with aiohttp's http_writer and parses with http_parser just as the server does,
# and asyncio.timeout inside the limiter is rate limiting, not the loop; asyncio/uvloop frames with nothing
# specific above them are the loop's own work (uvloop's C code shows as the Python frame that started it).
SHARED: tuple[tuple[str, str], ...] = (
    ("aiohttp/http_writer", "server"),
    ("aiohttp/http_parser", "server"),
    ("aiohttp/streams", "server"),
    ("asyncio/", LOOP),
    ("uvloop/", LOOP),
)
STAGE_ORDER = (
    "upstream client", "rate limiting", "server", "filter chain", "header copying", "JWT", "metrics",
    "access log", LOOP, OTHER,
)  # fmt: skip
PY_SPY_MISSING = (
    "py-spy is not installed: the breakdown needs it to sample the gateway (.venv/bin/pip install py-spy)"
)


RAW_NAME = "py-spy.raw"


class ProfileError(RuntimeError):
    """py-spy could not sample: the message says why and what to do, for the report instead of a traceback."""


def _match(path: str, table: tuple[tuple[str, str], ...]) -> str | None:
    best: tuple[int, str] | None = None
    probe = "/" + path
    for prefix, stage in table:
        if ("/" + prefix) in probe and (best is None or len(prefix) > best[0]):
            best = (len(prefix), stage)
    return best[1] if best else None


def frame_file(frame: str) -> str:
    """'func (pkg/mod.py:12)' or 'func (pkg/mod.py)' -> 'pkg/mod.py'."""
    start = frame.rfind(" (")
    if start < 0 or not frame.endswith(")"):
        return ""
    path = frame[start + 2 : -1]
    head, sep, tail = path.rpartition(":")
    return head if sep and tail.isdigit() else path


def stage_of(stack: list[str]) -> str:
    """The stage of one sample; `stack` runs from the outermost frame to the innermost, as py-spy writes."""
    shared: str | None = None
    for frame in reversed(stack):
        path = frame_file(frame)
        if (stage := _match(path, STAGES)) is not None:
            return stage
        if shared is None:
            shared = _match(path, SHARED)
    return shared or OTHER


@dataclass
class Profile:
    """py-spy's samples, by stage and by innermost frame (self time)."""

    samples: int = 0
    by_stage: Counter[str] = field(default_factory=Counter)
    by_frame: Counter[str] = field(default_factory=Counter)
    frame_stage: dict[str, str] = field(default_factory=dict)


def parse_raw(text: str) -> Profile:
    """py-spy's `--format raw` output: one 'frame;frame;...;frame COUNT' line per distinct stack."""
    profile = Profile()
    for line in text.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        stack = [f for f in stack_text.split(";") if f.strip()]
        stage = stage_of(stack)
        leaf = stack[-1].strip() if stack else "(no Python stack)"
        profile.samples += count
        profile.by_stage[stage] += count
        profile.by_frame[leaf] += count
        profile.frame_stage.setdefault(leaf, stage)
    return profile


def ordered_stages(profile: Profile) -> list[str]:
    return sorted(
        profile.by_stage, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER)
    )


def stage_us(profile: Profile, cpu_us: float) -> dict[str, float]:
    """The measured CPU µs per request shared out by each stage's samples."""
    total = profile.samples or 1
    return {stage: cpu_us * profile.by_stage[stage] / total for stage in ordered_stages(profile)}


def format_breakdown(profile: Profile, cpu_us: float, requests: int, rate: int, top: int) -> list[str]:
    """The report: µs per request per stage (the measured CPU shared out by samples) and the top frames."""
    if not profile.samples:
        return ["breakdown: py-spy recorded no samples (was the gateway busy? try a longer --duration)"]
    # Both totals, so a profiler that fell behind (sampled seconds well below measured) shows.
    sampled_s, measured_s = profile.samples / rate, cpu_us * requests / 1e6
    lines = [
        f"CPU per request by stage: {cpu_us:.0f} µs/req measured ({measured_s:.1f} s of CPU over {requests} "
        f"requests), shared out by {profile.samples} samples at {rate} Hz (≈ {sampled_s:.1f} s sampled):",
        f"  {'stage':<18} {'µs/req':>8} {'share':>7}",
    ]
    for stage, us in stage_us(profile, cpu_us).items():
        lines.append(f"  {stage:<18} {us:>8.1f} {profile.by_stage[stage] / profile.samples:>7.1%}")
    lines += ["", f"top {top} frames by self time:", f"  {'µs/req':>8} {'share':>7}  {'stage':<16} frame"]
    for frame, count in profile.by_frame.most_common(top):
        share = count / profile.samples
        lines.append(f"  {cpu_us * share:>8.1f} {share:>7.1%}  {profile.frame_stage[frame]:<16} {frame}")
    return lines


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (the venv's bin), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


@dataclass
class Recording:
    """A running py-spy; `output` holds the raw profile once the context below has exited."""

    output: Path
    log: Path


def _explain(log: Path, code: int | None) -> str:
    text = log.read_text(errors="replace").strip() if log.exists() else ""
    hint = ""
    if "ermission" in text or "ptrace" in text.lower() or "EPERM" in text:
        hint = (
            "\n  py-spy needs to ptrace the gateway: run as root, or with CAP_SYS_PTRACE "
            "(docker run --cap-add SYS_PTRACE), or set kernel.yama.ptrace_scope=0"
        )
    status = "still starting" if code is None else f"exited with code {code}"
    return f"py-spy {status}: {text[-800:] or '(no output)'}{hint}"


@contextlib.contextmanager
def record(pid: int, workdir: Path, rate: int, start_timeout: float = 15.0) -> Iterator[Recording]:
    """Samples `pid` until the block ends. Raises ProfileError (before the block runs) when py-spy is
    missing or cannot attach, so the caller can still measure without it."""
    binary = find_py_spy()
    if binary is None:
        raise ProfileError(PY_SPY_MISSING)
    rec = Recording(workdir / RAW_NAME, workdir / "py-spy.log")
    # --nolineno: one row per function, which is what "top frames" should rank; --nonblocking: reading the
    # gateway's memory without stopping it, so the profile does not slow what it measures.
    argv = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--nolineno",
            "--nonblocking", "--output", str(rec.output)]  # fmt: skip
    with rec.log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_sampling(proc, rec.log, start_timeout)
        yield rec
    finally:
        _stop(proc)
    if not rec.output.exists():
        raise ProfileError(_explain(rec.log, proc.returncode))


def _wait_sampling(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    # py-spy says "Sampling process ..." once attached: load before that would go unsampled.
    deadline = time.monotonic() + timeout
    while "Sampling process" not in (log.read_text(errors="replace") if log.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ProfileError(_explain(log, proc.poll()))
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # SIGINT is py-spy's Ctrl-C: it stops sampling and writes the file. Only a hung py-spy gets killed.
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
