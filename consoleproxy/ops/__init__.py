"""
Running consoleproxy: Prometheus metrics (``metrics``), ``/healthz`` and
``/readyz`` (``health``), and the audit log of console sessions (``audit``).

May import: everything but ``tap`` and ``config``; it observes the relays
through ``relay.session_events`` and probes guacd and the clouds.
"""
