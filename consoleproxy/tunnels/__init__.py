"""
How guacd (or the raw VNC relay) reaches a console: directly, or through an
SSH tunnel to the hypervisor (``routes``), carried by Twisted Conch
``direct-tcpip`` channels pooled per hypervisor (``ssh``).

May import: the core modules at the top (``consoles``, ``errors``,
``interfaces``, ``tokens``), ``consoleproxy.guacamole`` and
``consoleproxy.net``.  Never the clouds, the web front, the relays or ops.
"""
