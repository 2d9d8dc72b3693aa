"""The layers point one way: the papers' math (edm_jax/diffusion/) and the networks (edm_jax/networks/) import
nothing of the drivers (training, generation, evaluation, interop, the CLI). Read from the source with ast, so
a lazy import inside a function counts too. And the console is main.py's: no module of the library prints,
writes to sys.stdout/sys.stderr, attaches a StreamHandler or configures the root logger; it only logs."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "edm_jax"
PURE = ("diffusion", "networks")
# What the pure layers may import from edm_jax: themselves, and the old public paths of the math, which
# are aliases of edm_jax.diffusion modules (edm_jax/precond.py etc.).
ALIASES = {"precond", "losses", "schedules", "sampling", "guidance", "augment", "toy", "rng"}


def _edm_imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("edm_jax"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edm_jax"):
            if node.module == "edm_jax":
                yield from (f"edm_jax.{a.name}" for a in node.names)
            else:
                yield node.module


def _allowed(module):
    parts = module.split(".")
    return len(parts) >= 2 and (parts[1] in PURE or parts[1] in ALIASES)


def test_math_and_networks_import_no_driver():
    offending = {}
    for layer in PURE:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            bad = sorted({m for m in _edm_imports(path) if not _allowed(m)})
            if bad:
                offending[str(path.relative_to(PACKAGE))] = bad
    assert not offending, f"pure layers import drivers: {offending}"


def test_the_check_sees_a_driver_import(tmp_path):
    """The reader is not vacuous: a driver import, eager or lazy, is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("import edm_jax.train\n\ndef f():\n    from edm_jax import generate\n")
    assert sorted(m for m in _edm_imports(probe) if not _allowed(m)) == ["edm_jax.generate", "edm_jax.train"]


def test_old_public_paths_are_the_moved_modules():
    import edm_jax.diffusion.precond
    import edm_jax.precond

    assert edm_jax.precond is edm_jax.diffusion.precond


# What only main.py may do to the console: print, write to the standard streams, attach a stream handler,
# configure the root logger (logging.basicConfig). A FileHandler (a run's log.txt) is the library's.
_CONSOLE_CALLS = {"print", "StreamHandler", "basicConfig"}


def _console_uses(path):
    """(line, what) of every console use in the file at `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in _CONSOLE_CALLS:
                yield node.lineno, name
            if (isinstance(f, ast.Attribute) and f.attr == "write" and isinstance(f.value, ast.Attribute)
                    and f.value.attr in ("stdout", "stderr")):
                yield node.lineno, f"{f.value.attr}.write"


def test_the_library_never_writes_to_the_console():
    offending = {str(path.relative_to(PACKAGE)): uses for path in sorted(PACKAGE.rglob("*.py"))
                 if (uses := sorted(_console_uses(path)))}
    assert not offending, f"library modules use the console (log through logging.getLogger(__name__)): {offending}"


def test_the_console_check_sees_each_kind_of_use(tmp_path):
    """The reader is not vacuous: a print, a stream write, a StreamHandler and basicConfig are each found,
    lazily inside a function too; a FileHandler and a logger call are not console uses."""
    probe = tmp_path / "probe.py"
    probe.write_text("import logging, sys\nprint('x')\n\ndef f(log):\n    sys.stderr.write('y')\n"
                     "    log.addHandler(logging.StreamHandler(sys.stdout))\n    logging.basicConfig(level=20)\n"
                     "    log.addHandler(logging.FileHandler('log.txt'))\n    log.info('fine')\n")
    assert sorted(_console_uses(probe)) == [(2, "print"), (5, "stderr.write"), (6, "StreamHandler"),
                                            (7, "basicConfig")]
