"""The test suite's own shape: test modules share fixtures through conftest and helpers through plain helper modules,
never by importing one another; and tests replace public names only, never a library's private ones.

Importing a test module from another one drags its tests into the importer's namespace and gives the importer a
second copy of its module-scoped fixtures, and a change to one test file then breaks another far away. Importing
conftest is the same mistake (pytest loads it itself, under its own rules). A test that patches a private name
pins an implementation detail: renaming it breaks the test, or worse, leaves the patch applied to nothing.
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    """`name`, a dotted module path, names a test module or conftest (of this folder or any other)."""
    last = name.rsplit(".", 1)[-1]
    return last.startswith("test_") or last == "conftest"


def imports_of_test_modules(path: Path) -> list[str]:
    """Every import in the file at `path` (at any depth, relative or absolute) of a test module or of conftest."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if _is_test_module(module):
                found.append("." * node.level + module)
            else:  # `from tests import test_loader`, `from . import conftest`
                found += ["." * node.level + ".".join(filter(None, [module, alias.name])) for alias in node.names
                          if _is_test_module(alias.name)]
    return found


def test_the_checker_sees_every_form_of_import(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("import tests.test_loader\n"
                   "from tests.test_loader import SIZE, cache_dir\n"
                   "from tests import test_loop\n"
                   "from .test_train import cache\n"
                   "from . import conftest\n"
                   "from tests.conftest import patient_folders\n"
                   "def f():\n    import test_staging\n"
                   "from tests.helpers import SIZE\n"
                   "from tests import helpers\n"
                   "import testing_tools\n")
    assert imports_of_test_modules(bad) == [
        "tests.test_loader", "tests.test_loader", "tests.test_loop", ".test_train", ".conftest", "tests.conftest",
        "test_staging"]


def test_no_test_module_imports_another_or_conftest():
    files = sorted(TESTS.glob("*.py"))
    assert any(f.name == "test_loader.py" for f in files)  # the folder is the suite, not an empty match
    offenders = {f.name: names for f in files if (names := imports_of_test_modules(f))}
    assert offenders == {}, ("move what these share to tests/conftest.py (fixtures) or tests/helpers.py "
                             f"(plain helpers): {offenders}")


# Private names still patched, each waiting for a public seam in the library (remove the entry with the seam).
PRIVATE_PATCHES_PENDING: set[tuple[str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_patches(path: Path) -> list[str]:
    """The private names that `monkeypatch.setattr`/`delattr` or `mock.patch`/`patch.object` replace in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        strings = [a.value for a in node.args[:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        method = node.func.attr
        if method in ("setattr", "delattr") and isinstance(node.func.value, ast.Name) and \
                node.func.value.id == "monkeypatch" or method in ("patch", "object"):
            # monkeypatch.setattr(obj, "name", v) / setattr("pkg.mod.name", v); mock.patch("pkg.mod.name");
            # mock.patch.object(obj, "name")
            found += [part for s in strings[:1 if method == "patch" else 2] for part in s.split(".")[-1:]
                      if _private(part)]
    return found


def test_the_patch_checker_sees_private_targets(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("def test(monkeypatch):\n"
                   "    monkeypatch.setattr(Trainer, '_start', spy)\n"
                   "    monkeypatch.setattr('train.engine.trainer._helper', spy)\n"
                   "    monkeypatch.delattr(store, '_checked')\n"
                   "    mock.patch('train.run._main')\n"
                   "    mock.patch.object(Trainer, '_fit')\n"
                   "    monkeypatch.setattr(Trainer, 'fit', spy)\n"
                   "    monkeypatch.setattr(Trainer, '__call__', spy)\n"
                   "    monkeypatch.setattr(store, 'WRITE_BUFFER_BYTES', 1)\n"
                   "    monkeypatch.setenv('_X', '1')\n")
    assert private_patches(bad) == ["_start", "_helper", "_checked", "_main", "_fit"]


def test_tests_patch_no_private_name_of_the_library():
    found = {(f.name, name) for f in sorted(TESTS.glob("test_*.py")) for name in private_patches(f)}
    assert found - PRIVATE_PATCHES_PENDING == set(), "make a public seam for these (or patch a public caller)"
    assert PRIVATE_PATCHES_PENDING <= found, "a pending entry is gone from the tests: drop it from the list"
