"""
The folder tree is the architecture: each layer imports only the layers below it.

The layers, top to bottom, are those of ``consoleproxy/__init__.py``'s map.  A
module may import modules of its own unit and of any unit of a lower layer;
units of one layer (``web`` and ``relay``; ``clouds`` and ``tunnels``) never
import each other: what they share lives lower down.
"""

from __future__ import annotations

import ast
import configparser
import os

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "consoleproxy")

#: Units by layer, top first.  A unit is a subpackage or a group of top modules.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("root",),  # tap, config, the command line (cli, preflight, __main__)
    ("ops",),
    ("web", "relay"),
    ("clouds", "tunnels", "cluster"),
    ("core",),  # tokens, consoles, interfaces, errors, recordings
    ("guacamole",),
    ("net",),
)
ROOT_MODULES = frozenset({"tap", "config", "cli", "preflight", "workers", "__main__", "__init__"})
CORE_MODULES = frozenset({"tokens", "consoles", "interfaces", "errors", "recordings"})
RANK = {unit: len(LAYERS) - i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """The unit of a dotted module name below ``consoleproxy``."""
    parts = module.split(".")
    assert parts[0] == "consoleproxy", module
    if len(parts) == 1:
        return "root"
    head = parts[1]
    if head in ROOT_MODULES:
        return "root"
    if head in CORE_MODULES:
        return "core"
    if head not in RANK:
        raise KeyError(f"{module}: no layer for {head!r}; add it to LAYERS")
    return head


def allowed(importer: str, imported: str) -> bool:
    """May module C{importer} import module C{imported}?"""
    mine, theirs = unit_of(importer), unit_of(imported)
    return mine == theirs or RANK[theirs] < RANK[mine]


def consoleproxy_imports(source: str, module: str) -> list[str]:
    """Every consoleproxy module C{source} imports, at any depth of the code."""
    found = []
    package = module if module.endswith("__init__") else module.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "consoleproxy"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "consoleproxy":
                continue
            if name == "consoleproxy":
                found += [f"consoleproxy.{a.name}" for a in node.names]
            else:
                found.append(name)
    return found


def modules() -> dict[str, str]:
    """Every module of the package: dotted name -> path."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, ROOT)[: -len(".py")]
                found[relative.replace(os.sep, ".")] = path
    return found


def packages() -> list[str]:
    """Every package directory below ``consoleproxy`` (dotted), the top one included."""
    return sorted(
        os.path.relpath(d, ROOT).replace(os.sep, ".")
        for d, _, files in os.walk(PACKAGE)
        if "__init__.py" in files
    )


class LayerRuleTests(SynchronousTestCase):
    """The rule itself, on made-up imports: a checker that cannot fail proves nothing."""

    def test_downward_allowed(self) -> None:
        self.assertTrue(allowed("consoleproxy.web.api", "consoleproxy.tokens"))
        self.assertTrue(allowed("consoleproxy.relay.websocket", "consoleproxy.net.clients"))
        self.assertTrue(allowed("consoleproxy.tap", "consoleproxy.ops.metrics"))
        self.assertTrue(allowed("consoleproxy.relay.rfb_relay", "consoleproxy.relay.websocket"))

    def test_upward_and_sideways_refused(self) -> None:
        self.assertFalse(allowed("consoleproxy.relay.websocket", "consoleproxy.web.site"))
        self.assertFalse(allowed("consoleproxy.web.api", "consoleproxy.relay.sessions"))
        self.assertFalse(allowed("consoleproxy.web.site", "consoleproxy.ops.health"))
        self.assertFalse(allowed("consoleproxy.clouds.inventory", "consoleproxy.tunnels.ssh"))
        self.assertFalse(allowed("consoleproxy.tunnels.ssh", "consoleproxy.clouds.inventory"))
        self.assertFalse(allowed("consoleproxy.net.routing", "consoleproxy.errors"))
        self.assertFalse(allowed("consoleproxy.tokens", "consoleproxy.config"))

    def test_imports_found_at_any_depth(self) -> None:
        source = (
            "from consoleproxy.net import clients\n"
            "def f():\n    import consoleproxy.web.site\n"
            "    from .sessions import SessionTable\n"
            "from consoleproxy import tap\n"
        )
        self.assertEqual(
            consoleproxy_imports(source, "consoleproxy.relay.websocket"),
            [
                "consoleproxy.net",
                "consoleproxy.tap",
                "consoleproxy.web.site",
                "consoleproxy.relay.sessions",
            ],
        )

    def test_unknown_unit_named(self) -> None:
        self.assertRaises(KeyError, unit_of, "consoleproxy.newthing.x")


class LayoutTests(SynchronousTestCase):
    """The package as it is obeys the rule, and the layout is documented and shipped."""

    def test_no_import_goes_up_or_sideways(self) -> None:
        wrong = []
        for module, path in sorted(modules().items()):
            with open(path, encoding="utf-8") as f:
                source = f.read()
            for imported in consoleproxy_imports(source, module):
                if not allowed(module, imported):
                    wrong.append(f"{module} imports {imported}")
        self.assertEqual(wrong, [])

    def test_subpackage_inits_are_a_docstring(self) -> None:
        for package in packages():
            if package == "consoleproxy":
                continue
            path = os.path.join(ROOT, *package.split("."), "__init__.py")
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            docstring = ast.get_docstring(tree)
            self.assertTrue(docstring, f"{path} has no docstring")
            self.assertIn("May import", docstring, f"{path} does not say what it may import")
            self.assertEqual(len(tree.body), 1, f"{path} holds more than its docstring")

    def test_every_package_is_shipped(self) -> None:
        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        listed = set(config["options"]["packages"].split())
        self.assertEqual(set(packages()) - listed, set())

    def test_tests_mirror_the_layout(self) -> None:
        for package in packages():
            parts = package.split(".")[1:]
            if parts:
                directory = os.path.join(ROOT, "tests", *parts)
                self.assertTrue(
                    os.path.isfile(os.path.join(directory, "__init__.py")),
                    f"{package} has no tests/{'/'.join(parts)}/",
                )
