"""
Running consoleproxy: Prometheus metrics (``metrics``), ``/healthz`` and
``/readyz`` (``health``), the audit log of console sessions (``audit``), and
systemd's readiness notifications (``systemd``).

May import: everything but ``tap`` and ``config``; it observes the relays
through ``relay.session_events`` and probes guacd and the clouds.
"""
