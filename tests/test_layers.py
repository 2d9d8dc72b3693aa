"""The layers point one way: the papers' math (edm_jax/diffusion/) and the networks (edm_jax/networks/) import
nothing of the drivers (training, generation, evaluation, interop, the CLI). Read from the source with ast, so
a lazy import inside a function counts too."""

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
