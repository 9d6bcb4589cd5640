"""The results of one run, and their markdown: tables, ratios and the issue's targets."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .load import LoadResult
from .streams import DripTimes

DIRECT, FLOOR = "direct", "floor"


def pct(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


@dataclass
class Row:
    load: LoadResult
    cpu_us: float  # the target's CPU time per request (its whole process tree)
    upstream_pct: float  # the upstream's CPU use during the run, % of one core


@dataclass
class GatewayStats:
    idle_rss: float = 0.0
    loaded_rss: float = 0.0
    hold_before: float = 0.0
    hold_rss: float = 0.0
    hold_open: int = 0
    fallback: dict[str, LoadResult] = field(default_factory=dict)


@dataclass
class Results:
    started: str
    loadgen: str
    seconds: float
    repeat: int
    concurrency: list[int]
    hold_count: int
    rows: dict[tuple[str, bool, int], Row] = field(default_factory=dict)
    idle_rss: dict[str, float] = field(default_factory=dict)
    gateways: dict[str, GatewayStats] = field(default_factory=dict)
    drips: dict[str, DripTimes] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)
    micro: str = ""
    notes: list[str] = field(default_factory=list)

    def targets(self) -> list[str]:
        return list(dict.fromkeys(t for t, _, _ in self.rows))


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    libs = []
    for name in ("litestar", "uvicorn", "granian", "aiohttp", "uvloop", "httptools", "msgspec"):
        try:
            libs.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()} "
        f"({platform.system()} {platform.release()}); " + ", ".join(libs)
    )


def revision() -> str:
    """The commit under test, and whether proxy/ has uncommitted changes."""
    try:
        cmd = ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"]
        sha = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        cmd = ["git", "-C", str(Path(__file__).parent.parent), "status", "--short", "proxy"]
        dirty = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = len(dirty.splitlines())
    return f"{sha or 'unknown'}" + (
        f" + uncommitted changes to {changed} file(s) in proxy/" * bool(changed)
    )


def _f(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def throughput_table(r: Results) -> str:
    lines = [
        "| target | stream | conc | req/s | p50 ms | p99 ms | CPU µs/req | upstream CPU "
        "| ×direct | ×floor | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for stream in (False, True):
        for conc in r.concurrency:
            direct = r.rows.get((DIRECT, stream, conc))
            floor = r.rows.get((FLOOR, stream, conc))
            for target in r.targets():
                row = r.rows.get((target, stream, conc))
                if row is None:
                    continue
                ld = row.load
                vs_direct = ld.rps / direct.load.rps if direct and target != DIRECT else None
                vs_floor = (
                    ld.rps / floor.load.rps if floor and target not in (DIRECT, FLOOR) else None
                )
                up = "-" if target == DIRECT else f"{row.upstream_pct:.0f}%"
                lines.append(
                    f"| {target} | {'yes' if stream else 'no'} | {conc} | {ld.rps:,.0f} "
                    f"| {_f(ld.p50_ms)} | {_f(ld.p99_ms)} | {row.cpu_us:,.0f} | {up} "
                    f"| {_ratio(vs_direct)} | {_ratio(vs_floor)} | {ld.errors} |"
                )
    return "\n".join(lines) + "\n"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _added(r: Results, target: str, key: str, p: int) -> float:
    """A drip measure's percentile through `target` minus the same measure direct."""
    through, direct = r.drips.get(target), r.drips.get(DIRECT)
    if through is None or direct is None:
        return float("nan")
    return pct(getattr(through, key), p) - pct(getattr(direct, key), p)


def drip_table(r: Results) -> str:
    lines = [
        "| target | request reaches upstream p50 | TTFT p50 / p99 | first-chunk relay p50 / p99 "
        "| per-chunk relay p50 / p99 | added TTFT p50 | added first chunk p50 / p99 "
        "| added per chunk p50 / p99 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, d in r.drips.items():
        cells = [_f(pct(d.request_ms, 50), 3)]
        for key in ("ttft_ms", "first_ms", "later_ms"):
            cells.append(f"{_f(pct(getattr(d, key), 50), 3)} / {_f(pct(getattr(d, key), 99), 3)}")
        if name == DIRECT:
            cells += ["-", "-", "-"]
        else:
            cells.append(_f(_added(r, name, "ttft_ms", 50), 3))
            for key in ("first_ms", "later_ms"):
                lo, hi = _added(r, name, key, 50), _added(r, name, key, 99)
                cells.append(f"{_f(lo, 3)} / {_f(hi, 3)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gateway_table(r: Results) -> str:
    names = list(r.gateways)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "--:|" * len(names)]

    def add(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    gws = [r.gateways[n] for n in names]
    add("RSS idle (after 1 request), MB", [_f(g.idle_rss, 1) for g in gws])
    add("RSS after the load runs, MB", [_f(g.loaded_rss, 1) for g in gws])
    add(
        f"RSS with {r.hold_count} open streams, MB (open)",
        [f"{_f(g.hold_rss, 1)} ({g.hold_open})" for g in gws],
    )
    add("… added by the open streams, MB", [_f(g.hold_rss - g.hold_before, 1) for g in gws])
    for stream in (False, True):
        label = f"CPU µs/req, {'stream' if stream else 'non-stream'}, conc 32"
        add(label, [_f(_cpu(r, n, stream, 32), 0) for n in names])
    healthy = [g.fallback.get("bench") for g in gws]
    for alias, label in (
        ("bench", "healthy alias, conc 1"),
        ("bench-fallback", "fallback past a refused port (breaker off)"),
        ("bench-fallback-breaker", "fallback, default breaker (open after 5)"),
    ):
        vals = []
        for g, h in zip(gws, healthy, strict=True):
            x = g.fallback.get(alias)
            if x is None:
                vals.append("-")
                continue
            extra = "" if alias == "bench" or h is None else f" ({x.p50_ms - h.p50_ms:+.2f})"
            vals.append(f"{_f(x.p50_ms)} / {_f(x.p99_ms)}{extra}")
        add(f"{label}: p50 / p99 ms", vals)
    return "\n".join(lines) + "\n"


def _cpu(r: Results, target: str, stream: bool, conc: int) -> float:
    row = r.rows.get((target, stream, conc))
    return row.cpu_us if row else float("nan")


def _check(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def gains_table(r: Results, base: str = "gateway/uvicorn") -> str:
    """Every other gateway-like target against `base`, cell by cell."""
    others = [t for t in r.targets() if t not in (DIRECT, FLOOR, base)]
    concs = r.concurrency
    head = " | ".join(f"req/s ×, conc {c}" for c in concs)
    lines = [f"| vs {base} | stream | {head} | p50 ms, conc 1 | CPU µs/req, conc 32 |"]
    lines.append("|---|---|" + "--:|" * (len(concs) + 2))
    for name in others:
        for stream in (False, True):
            cells = []
            for c in concs:
                a, b = r.rows.get((name, stream, c)), r.rows.get((base, stream, c))
                cells.append(f"{a.load.rps / b.load.rps:.2f}" if a and b else "-")
            a1, b1 = r.rows.get((name, stream, 1)), r.rows.get((base, stream, 1))
            lat = f"{b1.load.p50_ms:.2f} → {a1.load.p50_ms:.2f}" if a1 and b1 else "-"
            a32, b32 = r.rows.get((name, stream, 32)), r.rows.get((base, stream, 32))
            cpu = f"{b32.cpu_us:,.0f} → {a32.cpu_us:,.0f}" if a32 and b32 else "-"
            mode = "yes" if stream else "no"
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + f" | {lat} | {cpu} |")
    return "\n".join(lines) + "\n"


_TARGETS = (
    "non-stream conc 32 ≥ 70% of the floor's req/s",
    "added latency conc 1, p50 < 0.5 ms",
    "added latency conc 1, p99 < 2 ms",
    "first chunk relayed within 1 ms (added p50 / p99; judged on p99)",
    "per-chunk added delay p99 < 1 ms",
    "idle RSS < 120 MB",
    "open streams add < 150 MB",
)


def _target_cells(r: Results, name: str) -> list[str]:
    """One target's column: each of `_TARGETS`, met or not, with its figure."""
    cells = ["-"] * len(_TARGETS)
    row, floor = r.rows.get((name, False, 32)), r.rows.get((FLOOR, False, 32))
    if row and floor:
        ratio = row.load.rps / floor.load.rps
        cells[0] = f"{_check(ratio >= 0.7)} {ratio:.0%}"
    row, direct = r.rows.get((name, False, 1)), r.rows.get((DIRECT, False, 1))
    if row and direct:
        p50, p99 = row.load.p50_ms - direct.load.p50_ms, row.load.p99_ms - direct.load.p99_ms
        cells[1] = f"{_check(p50 < 0.5)} {p50:+.3f} ms"
        cells[2] = f"{_check(p99 < 2)} {p99:+.3f} ms"
    if name in r.drips and DIRECT in r.drips:
        f50, f99 = _added(r, name, "first_ms", 50), _added(r, name, "first_ms", 99)
        cells[3] = f"{_check(f99 < 1)} {f50:+.3f} / {f99:+.3f} ms"
        later = _added(r, name, "later_ms", 99)
        cells[4] = f"{_check(later < 1)} {later:+.3f} ms"
    if name in r.idle_rss:
        rss = r.idle_rss[name]
        workers = name.rpartition(" x")[2] if " x" in name else ""
        # the target is for one worker; N workers are shown, not judged
        judged = f"{_check(rss < 120)} {rss:.1f} MB"
        cells[5] = f"{rss:.1f} MB, {workers} workers" if workers else judged
    g = r.gateways.get(name)
    if g is not None:
        grew = g.hold_rss - g.hold_before
        ok = grew < 150 and g.hold_open >= r.hold_count
        cells[6] = f"{_check(ok)} {grew:+.1f} MB ({g.hold_open} of {r.hold_count} open)"
    return cells


def targets_table(r: Results) -> str:
    names = [t for t in r.targets() if t not in (DIRECT, FLOOR)]
    columns = [_target_cells(r, n) for n in names]
    lines = ["| target | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, label in enumerate(_TARGETS):
        lines.append(f"| {label} | " + " | ".join(c[i] for c in columns) + " |")
    return "\n".join(lines) + "\n"


def markdown(r: Results) -> str:
    parts = [
        f"# OmniMind Gateway benchmark, {r.started}",
        "",
        f"- machine: {machine()}",
        f"- code: {revision()}",
        f"- load generator: {r.loadgen}; {r.seconds:g} s per run, best of {r.repeat} "
        "(interleaved across targets); single worker except where a target says xN",
        "- direct: bench/upstream.py (raw asyncio Protocol on uvloop, canned bytes); floor: "
        "bench/floor.py (Litestar + aiohttp pass-through on uvicorn)",
        "- gateway: `python -m proxy serve` (uvicorn, uvloop + httptools) and granian "
        "(`bench.asgi:app`)",
        "- gateway/uvicorn xN = `serve --workers N`; gateway+tuned (with --prototype) = "
        "bench/tuned.py's lazy disconnect watcher, patched in that process only",
        "- stream = 10 SSE chunks per answer; CPU µs/req: the target's CPU time (psutil, "
        "whole process tree) / requests; upstream CPU: % of one core during the run",
        "",
        "## Throughput and latency",
        "",
        throughput_table(r),
        "### Against the shipped gateway (gateway/uvicorn)",
        "",
        gains_table(r),
        "## Dripping stream, concurrency 1 (10 chunks 5 ms apart; ms)",
        "",
        "Client-side timestamps against the upstream's own: the request path, the time to "
        "first token, and each chunk's relay from the upstream's write to the client's read.",
        "",
        drip_table(r),
        "## Gateway: memory, fallback, CPU",
        "",
        gateway_table(r),
        "Idle RSS of every target, MB: " + ", ".join(f"{k} {v:.1f}" for k, v in r.idle_rss.items()),
        "",
        "## Targets",
        "",
        targets_table(r),
    ]
    if r.notes:
        parts += ["## Notes", "", *[f"- {n}" for n in r.notes], ""]
    if r.micro:
        parts += ["## Hot-path micro-costs (bench/micro.py, µs per call)", "", r.micro]
    if r.profiles:
        parts += ["## Profiles (py-spy, gateway under load)", "", *r.profiles]
    return "\n".join(parts)
