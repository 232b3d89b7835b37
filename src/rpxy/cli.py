"""``rpxy --config FILE [--log-dir DIR]``: the Rust rpxy's command line, plus ``--check``.

This is an entry point: it parses flags, installs the reactor's logging, builds the
service with :func:`rpxy.service.make_service` and runs the reactor. Nothing else.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from twisted.internet.error import CannotListenError

from rpxy import __version__
from rpxy.config.load import ConfigError, load_config_file
from rpxy.state import build_tls_contexts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpxy",
        description="rpxy for Twisted: a reverse proxy serving many domains, configured like the Rust rpxy.",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="Configuration file path like ./config.toml")
    parser.add_argument(
        "-l",
        "--log-dir",
        metavar="LOG_DIR",
        help="Directory for log files (access.log, rpxy.log). If not specified, logs are printed to stdout.",
    )
    parser.add_argument(
        "--check", action="store_true", help="Validate the configuration, report problems and exit (0 = valid)."
    )
    parser.add_argument("-V", "--version", action="version", version=f"rpxy {__version__.public()}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.config:
        build_parser().error("the following arguments are required: -c/--config")
    try:
        loaded = load_config_file(args.config)
    except ConfigError as error:
        print(f"rpxy: invalid configuration {args.config}:", file=sys.stderr)
        for line in error.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    try:
        # Certificates and keys are read now too (like `nginx -t`), not at the first handshake.
        build_tls_contexts(loaded.config)
    except ConfigError as error:
        print(f"rpxy: invalid configuration {args.config}:", file=sys.stderr)
        for line in error.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    if args.check:
        for warning in loaded.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"rpxy: configuration {args.config} is valid")
        return 0

    if "twisted.internet.reactor" not in sys.modules:
        from rpxy.reactor import install

        install()
    from twisted.internet import reactor

    from rpxy.logs import open_system_log, start_system_logging
    from rpxy.service import make_service

    try:
        system_stream = open_system_log(args.log_dir)
    except OSError as error:
        print(f"rpxy: cannot use log directory {args.log_dir}: {error.strerror or error}", file=sys.stderr)
        return 1
    start_system_logging(system_stream)
    service = make_service(args.config, reactor=reactor, log_dir=args.log_dir, loaded=loaded)
    try:
        service.startService()
    except CannotListenError as error:
        print(f"rpxy: cannot listen: {error}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
