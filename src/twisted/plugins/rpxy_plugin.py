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
    ]

    def postOptions(self) -> None:
        from rpxy.config.load import ConfigError, load_config_file

        if not self["config"]:
            raise usage.UsageError("--config is required")
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

        from rpxy.service import make_service

        return make_service(options["config"], reactor=reactor, log_dir=options["log-dir"], loaded=options.loaded)


serviceMaker = RpxyServiceMaker()
