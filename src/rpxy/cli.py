"""``rpxy --config FILE [--log-dir DIR]``: the Rust rpxy's command line, plus ``--check``.

This is an entry point: it parses flags, installs the reactor's logging, builds the
service with :func:`rpxy.service.make_service` and runs the reactor. Nothing else.
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument(
        "--config-watch",
        choices=("auto", "poll", "none"),
        default="auto",
        help="How to notice config file changes: auto (inotify + a stat poll), poll, none (SIGHUP only). Default: auto.",
    )
    parser.add_argument(
        "--config-poll-interval",
        metavar="SECONDS",
        type=_positive_float,
        default=None,
        help="Seconds between stat checks of the config file (default 2).",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=_worker_count,
        default=None,
        help="Worker processes sharing the listening ports (overrides the config's workers; default 1).",
    )
    parser.add_argument("-V", "--version", action="version", version=f"rpxy {__version__.public()}")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _worker_count(text: str) -> int:
    from rpxy.config.load import MAX_WORKERS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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

    from rpxy import workers

    worker = workers.worker_index(os.environ)
    count = args.workers or loaded.config.workers
    if worker is None and count > 1:
        # The supervisor (rpxy/workers.py, docs/operations.md#workers): no reactor here.
        if loaded.config.experimental.acme is not None:
            print("rpxy: workers > 1 is not supported with [experimental.acme] (each worker would order certificates)",
                  file=sys.stderr)
            return 1
        return workers.run_supervisor(
            argv, count, log_dir=args.log_dir, graceful_shutdown_timeout=loaded.config.graceful_shutdown_timeout
        )
    if worker is not None:
        workers.die_with_supervisor()

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
    start_system_logging(system_stream if worker is None else workers.TaggedLines(system_stream, worker))
    from rpxy.reload import CONFIG_POLL_INTERVAL, install_sighup

    service = make_service(
        args.config,
        reactor=reactor,
        log_dir=args.log_dir,
        loaded=loaded,
        config_watch=args.config_watch,
        config_poll_interval=args.config_poll_interval or CONFIG_POLL_INTERVAL,
        worker=worker,
    )
    from rpxy.shutdown import install_shutdown_signals

    # Now (a signal while starting stops gracefully too), and again once the reactor runs:
    # it installs its own handlers as it starts. Ours stop gracefully with exit status 0.
    install_shutdown_signals(reactor, service.force_stop)
    reactor.callWhenRunning(install_shutdown_signals, reactor, service.force_stop)
    try:
        service.startService()
    except CannotListenError as error:
        print(f"rpxy: cannot listen: {error}", file=sys.stderr)
        return 1
    install_sighup(reactor, lambda: service.reload(force=True, reason="SIGHUP"))
    if worker is not None:
        reactor.callWhenRunning(workers.report_ready)  # listening, signals installed
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    from rpxy.runtime import tune_garbage_collector

    reactor.callWhenRunning(tune_garbage_collector)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
