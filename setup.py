"""
The build step that puts the console page's npm libraries into the wheel.

Everything else is declared in ``setup.cfg``.  The libraries are npm packages
(``package.json``, pinned by ``package-lock.json``, installed by ``npm ci``
into ``node_modules/``, never committed); a wheel must carry the files the
server serves, so ``build_py`` copies them from ``node_modules/`` into
``consoleproxy/web/vendor/`` of the build (never of the source tree), with
each package's ``package.json`` (its version names the URL) and its licence
files.  Which files: the ``VENDOR_PACKAGES`` and ``CONTENT_TYPES`` of
``consoleproxy/web/assets.py``, read without importing it (the build needs
no dependency).  Editable installs copy nothing: they serve ``node_modules``
beside the checkout.  A missing package fails the build, naming it.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import SetupError

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "consoleproxy" / "web" / "assets.py"
#: Where the libraries go, inside the built package.
VENDOR = Path("consoleproxy", "web", "vendor")
#: Licence and notice files shipped with each package, wherever they are in it.
LICENCE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")


def _literal(name: str) -> object:
    """The literal value of C{name} in assets.py (calls give their argument tuples)."""
    for node in ast.parse(ASSETS.read_text("utf-8")).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                value = node.value
                calls = isinstance(value, ast.Tuple) and value.elts
                if calls and all(isinstance(e, ast.Call) for e in calls):
                    return [tuple(ast.literal_eval(a) for a in e.args) for e in value.elts]
                return ast.literal_eval(value)
    raise SetupError(f"{ASSETS} defines no {name}")


def vendor_files(node_modules: Path) -> list[tuple[Path, Path]]:
    """(source, path inside the vendor folder) of every file the page may be served."""
    extensions = set(_literal("CONTENT_TYPES"))
    files = []
    for _name, package, subdirectory, entry in _literal("VENDOR_PACKAGES"):
        root = node_modules / package
        served = root / subdirectory
        if not (root / "package.json").is_file() or not (served / entry).is_file():
            raise SetupError(
                f"the console page's npm package {package} is not installed in {node_modules}: "
                "run `npm ci` (scripts/setup does) before building, or set "
                "CONSOLEPROXY_NODE_MODULES to the node_modules folder that has it"
            )
        licences = [
            f
            for f in root.rglob("*")
            if f.is_file() and f.name.upper().startswith(LICENCE_PREFIXES)
        ]
        if not licences:
            raise SetupError(f"npm package {package} has no licence file to ship")
        chosen = {root / "package.json", *licences}
        chosen.update(f for f in served.rglob("*") if f.is_file() and f.suffix in extensions)
        files.extend((f, Path(package) / f.relative_to(root)) for f in sorted(chosen))
    return files


class build_py_with_vendor(build_py):  # noqa: N801 - setuptools' command naming
    """build_py, then the npm libraries into the built package (not in editable mode)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        node_modules = Path(os.environ.get("CONSOLEPROXY_NODE_MODULES") or HERE / "node_modules")
        target = Path(self.build_lib) / VENDOR
        if target.exists():
            shutil.rmtree(target)
        for source, relative in vendor_files(node_modules):
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)


setup(cmdclass={"build_py": build_py_with_vendor})
