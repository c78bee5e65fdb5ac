"""twistd plugin: ``twistd consoleproxy``.  Kept trivial so that it always imports."""

from twisted.application.service import ServiceMaker

consoleproxy = ServiceMaker(
    "consoleproxy",
    "consoleproxy.tap",
    "Web console proxy: console tokens and a Guacamole WebSocket relay to guacd.",
    "consoleproxy",
)
