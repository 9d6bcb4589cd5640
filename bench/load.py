"""Load generation: wrk with a Lua POST script, else several `bench.pyload` processes."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .procs import PY, ROOT

_PROMPT = (
    "You are a concise assistant. Answer in one short paragraph and do not use lists. "
    "Explain what a reverse proxy does and why an LLM gateway falls back between providers."
)
_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRKRESULT %d %d %d %.1f %.1f\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def chat_body(model: str, stream: bool) -> bytes:
    messages = [
        {"role": "system", "content": "You are OmniMind, a helpful assistant."},
        {"role": "user", "content": _PROMPT},
    ]
    body = {"model": model, "messages": messages, "stream": stream, "max_tokens": 64}
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def find_wrk(install: bool) -> str | None:
    """wrk on PATH; with `install`, try apt-get once (root on Debian/Ubuntu only)."""
    found = shutil.which("wrk")
    if found or not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("bench: wrk not found; trying apt-get install wrk ...", flush=True)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            print("bench: could not install wrk; using the Python load generator", flush=True)
            return None
    return shutil.which("wrk")


class Load:
    """Runs one time-bound load at a given concurrency; `wrk` None means bench.pyload."""

    def __init__(self, wrk: str | None, workdir: Path, py_procs: int = 2) -> None:
        self.wrk = wrk
        self.workdir = workdir
        self.py_procs = py_procs
        self._files: dict[bytes, Path] = {}

    @property
    def name(self) -> str:
        return "wrk" if self.wrk else f"bench.pyload x{self.py_procs}"

    def _file(self, body: bytes, suffix: str) -> Path:
        key = body + suffix.encode()
        if key not in self._files:
            fd, name = tempfile.mkstemp(suffix=suffix, dir=self.workdir)
            text = _LUA.format(body=body.decode()).encode() if suffix == ".lua" else body
            with os.fdopen(fd, "wb") as f:
                f.write(text)
            self._files[key] = Path(name)
        return self._files[key]

    def run(self, url: str, body: bytes, conns: int, seconds: float) -> LoadResult:
        if self.wrk:
            return self._wrk(url, body, conns, seconds)
        return self._py(url, body, conns, seconds)

    def _wrk(self, url: str, body: bytes, conns: int, seconds: float) -> LoadResult:
        script = self._file(body, ".lua")
        cmd = [self.wrk, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
               "-s", str(script), url]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
        line = next((x for x in out.splitlines() if x.startswith("WRKRESULT")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result:\n{out}")
        requests, duration_us, errors, p50, p99 = line.split()[1:]
        return LoadResult(
            int(requests), int(duration_us) / 1e6, int(errors), float(p50) / 1000,
            float(p99) / 1000,
        )  # fmt: skip

    def _py(self, url: str, body: bytes, conns: int, seconds: float) -> LoadResult:
        procs = min(self.py_procs, conns)
        shares = [conns // procs + (i < conns % procs) for i in range(procs)]
        file = self._file(body, ".json")
        outs = [self.workdir / f"pyload-{i}.json" for i in range(procs)]
        running = [
            subprocess.Popen(
                [
                    PY,
                    "-m",
                    "bench.pyload",
                    "--url",
                    url,
                    "--body-file",
                    str(file),
                    "--conns",
                    str(n),
                    "--seconds",
                    str(seconds),
                    "--out",
                    str(out),
                ],
                cwd=ROOT,
            )  # fmt: skip
            for n, out in zip(shares, outs, strict=True)
        ]
        for p in running:
            p.wait(timeout=seconds + 30)
        results = [json.loads(out.read_text()) for out in outs]
        latencies = sorted(x for r in results for x in r["latencies"])
        if not latencies:
            raise RuntimeError(f"no request completed against {url}")
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        return LoadResult(
            len(latencies), max(r["seconds"] for r in results),
            sum(r["errors"] for r in results), cuts[49] / 1000, cuts[98] / 1000,
        )  # fmt: skip
