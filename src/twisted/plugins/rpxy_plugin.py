"""``twist rpxy --config FILE`` and ``twistd -n rpxy --config FILE``."""

from __future__ import annotations

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Configuration file path like ./config.toml"],
        ["log-dir", "l", None, "Directory for access.log (system log goes to twistd's log)"],
        ["config-watch", None, "auto", "How to notice config changes: auto (inotify + stat poll), poll, none"],
        ["config-poll-interval", None, 2.0, "Seconds between stat checks of the config file", float],
    ]

    def postOptions(self) -> None:
        from rpxy.config.load import ConfigError, load_config_file

        if not self["config"]:
            raise usage.UsageError("--config is required")
        if self["config-watch"] not in ("auto", "poll", "none"):
            raise usage.UsageError("--config-watch must be auto, poll or none")
        if not self["config-poll-interval"] > 0:
            raise usage.UsageError("--config-poll-interval must be positive")
        from rpxy.state import build_tls_contexts

        try:
            self.loaded = load_config_file(self["config"])
            build_tls_contexts(self.loaded.config)
        except ConfigError as error:
            raise usage.UsageError("invalid configuration:\n  " + "\n  ".join(error.errors)) from None


@implementer(IServiceMaker, IPlugin)
class RpxyServiceMaker:
    tapname = "rpxy"
    description = "A reverse proxy serving many domains, configured like the Rust rpxy."
    options = Options

    def makeService(self, options: Options):
        from twisted.internet import reactor

        from rpxy.reload import install_sighup
        from rpxy.service import make_service

        service = make_service(
            options["config"],
            reactor=reactor,
            log_dir=options["log-dir"],
            loaded=options.loaded,
            config_watch=options["config-watch"],
            config_poll_interval=options["config-poll-interval"],
        )
        # SIGHUP re-reads the config (twistd rotates its log on SIGUSR1, not SIGHUP).
        reactor.callWhenRunning(install_sighup, reactor, lambda: service.reload(force=True, reason="SIGHUP"))
        # SIGTERM/SIGINT: a graceful stop (rpxy.shutdown) that twist/twistd end with exit status 0;
        # installed now (a signal while starting) and again after the reactor's own handlers.
        from rpxy.shutdown import install_shutdown_signals

        install_shutdown_signals(reactor, service.force_stop)
        reactor.callWhenRunning(install_shutdown_signals, reactor, service.force_stop)
        from rpxy.runtime import tune_garbage_collector

        reactor.callWhenRunning(tune_garbage_collector)
        return service


serviceMaker = RpxyServiceMaker()
