"""
Clouds: who may open which VM's console, and the guacd settings that reach it.

Each backend provides ``interfaces.ICloud`` and ``interfaces.IAuthenticator``:
the embedded inventory file (``inventory``, with its password hashes in
``passwords``), and OpenNebula (``opennebula``: oned over XML-RPC, VM documents
to console settings, zones).

May import: the core modules at the top (``consoles``, ``errors``,
``interfaces``, ``tokens``), ``consoleproxy.guacamole`` and
``consoleproxy.net``.  Never the web front, the relays, the tunnels or ops.
"""
