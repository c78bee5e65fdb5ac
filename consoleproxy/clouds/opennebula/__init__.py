"""
The OpenNebula cloud: oned over XML-RPC.

``cloud`` is the backend (authentication and VM look-ups through ``oned``,
which speaks over ``xmlrpc``); ``console_settings`` turns VM documents into
guacd settings (FireEdge's rules, without its flaws); ``zones`` finds other
zones' console proxies.

May import: what ``consoleproxy.clouds`` may import, and ``clouds.inventory``.
"""
