"""Sampling the gateway under load with py-spy, and summarising where its CPU goes.

Frames are grouped by where their file lives: the gateway (`proxy/`), Litestar, uvicorn,
aiohttp (with yarl and multidict), prometheus_client, asyncio and the rest of the standard
library. "self" is the innermost frame of a sample; "owner" is the innermost frame outside
the standard library (so asyncio work a package asks for is charged to that package).
Time inside uvloop's C code shows as self time of the frame that runs the loop. Only
samples holding the GIL count (`--gil`): Python at work, not threads waiting.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .procs import PY

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")
_GROUPS = {
    "proxy": "gateway (proxy/)",
    "bench": "bench prototype",
    "litestar": "litestar",
    "uvicorn": "uvicorn",
    "granian": "granian",
    "aiohttp": "aiohttp",
    "yarl": "aiohttp",
    "multidict": "aiohttp",
    "aiohappyeyeballs": "aiohttp",
    "prometheus_client": "prometheus_client",
    "msgspec": "msgspec",
    "asyncio": "asyncio",
    "anyio": "anyio",
}


def py_spy() -> str | None:
    local = Path(PY).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def group(file: str) -> str:
    """py-spy names files from their sys.path entry: `aiohttp/client.py`, `threading.py`."""
    if "site-packages/" in file:
        file = file.rsplit("site-packages/", 1)[1]
    top = file.split("/", 1)[0] if "/" in file else ""
    if top in _GROUPS:
        return _GROUPS[top]
    if not top or top in sys.stdlib_module_names:
        return "stdlib (other)"
    return "other"


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `seconds` into `out` (raw collapsed stacks)."""
    spy = py_spy()
    assert spy is not None
    cmd = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate),
           "-f", "raw", "-F", "--gil", "-o", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class Profile:
    samples: int = 0
    self_by_group: Counter[str] = field(default_factory=Counter)
    owner_by_group: Counter[str] = field(default_factory=Counter)
    self_by_func: Counter[tuple[str, str]] = field(default_factory=Counter)  # (function, group)
    gateway_own: Counter[str] = field(default_factory=Counter)  # owner is this proxy function
    gateway_inclusive: Counter[str] = field(default_factory=Counter)  # with all it calls

    def share(self, n: float) -> str:
        return f"{100 * n / self.samples:.1f}%" if self.samples else "-"


_GATEWAY = "gateway (proxy/)"
_ENTRY = ("proxy/__main__.py", "proxy/cli.py", "proxy/server.py")  # on every stack


def _parse(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    if m is None:
        return frame, "other"
    file = m["file"]
    grp = "entry" if file.endswith(_ENTRY) else group(file)
    return f"{m['func']} ({Path(file).name})", grp


def summarize(raw: Path) -> Profile:
    prof = Profile()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_parse(f) for f in stack.split(";")]
        prof.samples += n
        name, grp = frames[-1]
        prof.self_by_group[grp] += n
        prof.self_by_func[(name, grp)] += n
        outside = ((f, g) for f, g in reversed(frames) if not g.startswith(("std", "asyncio")))
        owner_name, owner = next(outside, frames[-1])
        prof.owner_by_group[owner] += n
        if owner == _GATEWAY:
            prof.gateway_own[owner_name] += n
        for name in {f for f, g in frames if g == _GATEWAY}:
            prof.gateway_inclusive[name] += n
    return prof


def markdown(title: str, prof: Profile, top: int = 12) -> str:
    if not prof.samples:
        return f"### {title}\n\nno samples\n"
    lines = [f"### {title} ({prof.samples} samples)", ""]
    lines += ["| group | self | owner |", "|---|--:|--:|"]
    for grp, n in prof.owner_by_group.most_common():
        lines.append(f"| {grp} | {prof.share(prof.self_by_group[grp])} | {prof.share(n)} |")
    for grp in set(prof.self_by_group) - set(prof.owner_by_group):
        lines.append(f"| {grp} | {prof.share(prof.self_by_group[grp])} | - |")
    lines += ["", f"Top {top} functions by self time:", ""]
    lines += ["| function | group | self |", "|---|---|--:|"]
    for (func, grp), n in prof.self_by_func.most_common(top):
        lines.append(f"| `{func}` | {grp} | {prof.share(n)} |")
    lines += ["", "Gateway functions by own time (self plus the stdlib and C code they call):", ""]
    lines += ["| function | own | inclusive |", "|---|--:|--:|"]
    for func, n in prof.gateway_own.most_common(top):
        lines.append(f"| `{func}` | {prof.share(n)} | {prof.share(prof.gateway_inclusive[func])} |")
    return "\n".join(lines) + "\n"
