"""omnimind-proxy: an OpenAI-compatible LLM gateway serving model aliases from provider chains."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, default_path, load

_CONFIG_HELP = "models.yaml to use (default: $OMNIMIND_CONFIG, else ./models.yaml)"


def _grace(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnimind-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=None, help=_CONFIG_HELP)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="worker processes")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--log-format", default="text", choices=["text", "json"],
        help="the server's own lines on stderr: text for people, json lines for machines "
        "(the audit log is JSON lines either way)",
    )  # fmt: skip
    serve.add_argument(
        "--shutdown-grace", type=_grace, default=10.0, metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long requests in flight may finish (default 10)",
    )  # fmt: skip
    check = sub.add_parser("check", help="validate the config and probe every provider")
    check.add_argument("--config", default=None, help=_CONFIG_HELP)
    models = sub.add_parser("models", help="print the aliases and their chains")
    models.add_argument("--config", default=None, help=_CONFIG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = args.config or default_path()
    try:
        config = load(path)
        if args.command == "serve":
            from .gateway import preflight  # an audit path or CIDR that cannot work

            preflight(config)
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

    from .server import CannotListen, ServeOptions, serve

    options = ServeOptions(
        host=args.host,
        port=args.port,
        workers=max(1, args.workers),
        log_level=args.log_level,
        log_format=args.log_format,
        shutdown_grace=args.shutdown_grace,
    )
    try:
        serve(config, options)
    except CannotListen as exc:
        print(f"omnimind-proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
