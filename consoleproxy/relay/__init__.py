"""
What carries a console between the browser and the VM.

``websocket`` is what both relays share (opening the token, the Origin check
of ``origins``, caps and drain through the ``sessions`` table, the events of
``session_events``); ``guacamole_relay`` speaks subprotocol ``guacamole`` to
the browser and the Guacamole protocol to guacd, or hops to another zone's
console proxy (``federation``); ``rfb_relay`` is raw VNC for noVNC, with
``rfb_input`` telling the user's input apart for the idle timeout;
``live_sessions`` lists and ends sessions for the sessions API (across
processes through ``cluster_sessions``).

May import: ``consoleproxy.clouds`` and ``consoleproxy.tunnels``, the core
modules at the top, ``consoleproxy.guacamole`` and ``consoleproxy.net``.
Never the web front or ops: what the relays share with them lives in
``consoleproxy.net``.
"""
