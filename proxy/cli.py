"""`omnimind-proxy`: serve, and look at a config."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, default_path, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnimind-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config", default=None, help="models.yaml (default: $OMNIMIND_CONFIG or ./models.yaml)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    models = sub.add_parser("models", help="print the aliases and their chains")
    models.add_argument("--config", default=None)
    args = parser.parse_args(argv)

    path = args.config or default_path()
    try:
        config = load(path)
    except ConfigError as exc:
        print(f"omnimind-proxy: config error: {exc}", file=sys.stderr)
        return 2

    if args.command == "models":
        for alias, entries in config.models.items():
            print(f"{alias}: " + " -> ".join(f"{e.provider}/{e.model}" for e in entries))
        return 0

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from .server import serve as run_server

    run_server(config, args.host, args.port, args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
