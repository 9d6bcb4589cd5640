"""omnimind-proxy: an OpenAI-compatible LLM gateway serving model aliases from provider chains."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, default_path, load

_CONFIG_HELP = "models.yaml to use (default: $OMNIMIND_CONFIG, else ./models.yaml)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnimind-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=None, help=_CONFIG_HELP)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="worker processes")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    check = sub.add_parser("check", help="validate the config and probe every provider")
    check.add_argument("--config", default=None, help=_CONFIG_HELP)
    models = sub.add_parser("models", help="print the aliases and their chains")
    models.add_argument("--config", default=None, help=_CONFIG_HELP)
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
    if args.command == "check":
        from .check import run_check

        return run_check(config)

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from .server import serve as run_server

    run_server(config, args.host, args.port, args.log_level, max(1, args.workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
