# twistd -ny example.tac   (config from $RPXY_CONFIG, default ./config-example.toml)
import os

from twisted.application import service
from twisted.internet import reactor

from rpxy.service import make_service

application = service.Application("rpxy")
make_service(
    os.environ.get("RPXY_CONFIG", "config-example.toml"),
    reactor=reactor,
    log_dir=os.environ.get("RPXY_LOG_DIR"),
).setServiceParent(application)
