"""The package layout: one role per top-level package and imports only down the arrows.

The table below is the one place the layout is written in code; the README prints it (checked
here), and every import of every module is checked against it with ``ast``, so a new import that
runs against the arrows fails the suite instead of waiting for a review.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Package:
    folder: str
    role: str
    imports: tuple[str, ...]
    """The project's packages it may import (``*``: any but tests)."""


LAYOUT: tuple[Package, ...] = (
    Package("replay_migrate", "shared root: version, the exception hierarchy, safe file opening and cache-file "
            "writes, sparse copies and moves, the external-tool runner, the libvirt save-header codec (stdlib "
            "only: the guest runs it too)",
            ()),
    Package("recorder", "in-guest agent (capture, sync marks, the virtio-serial channel); the input-log codec "
            "(sans-I/O)", ("replay_migrate",)),
    Package("vm", "the one layer that talks to libvirt: domains, clones, save/restore, screenshots, input, guest "
            "agent", ("replay_migrate",)),
    Package("differ", "block sources and sinks, Merkle trees, patching; `differ/protocol/`: the tree-walk and "
            "block-transfer protocol (sans-I/O)", ("replay_migrate",)),
    Package("replayer", "closed-loop replay of a log into a VM; scripted workloads",
            ("recorder", "vm", "replay_migrate")),
    Package("server", "the websocket session-handoff service and its client: sans-I/O cores, thin asyncio "
            "adapters", ("replay_migrate",)),
    Package("store", "the state store on a host: paths, guest-image cache, checkpoints and clones, a side's saved "
            "state, checkpoint trees, checkpoint export and import between sites", ("differ", "vm", "replay_migrate")),
    Package("migration", "orchestration of a migration's two sides: source, target, the report, cancellation",
            ("server", "store", "replayer", "differ", "recorder", "vm", "replay_migrate")),
    Package("cli", "the command line: `main(argv=None)`, the commands, text tables and progress",
            ("migration", "server", "store", "replayer", "differ", "recorder", "vm", "replay_migrate")),
    Package("bench", "benchmarks, the fuzz runner, their reports", ("*",)),
    Package("tests", "one test module per source module; `@pytest.mark.vm` for tests that use libvirt",
            ("*", "tests")),
)
OURS = frozenset(p.folder for p in LAYOUT)


def render() -> str:
    """The README's table."""
    rows = ["| folder | role | may import |", "|---|---|---|"]
    for p in LAYOUT:
        may = ("anything" if "*" in p.imports else ", ".join(f"`{i}`" for i in p.imports) or "stdlib only")
        rows.append(f"| `{p.folder}/` | {p.role} | {may} |")
    return "\n".join(rows) + "\n"


def imported_packages(path: Path) -> set[str]:
    """The project's top-level packages ``path`` imports (at any depth: lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & OURS
    return found


def test_every_package_imports_only_down_the_arrows() -> None:
    wrong = []
    for p in LAYOUT:
        allowed = set(p.imports) | {p.folder}
        if "*" in allowed:
            allowed |= OURS - {"tests"}
        for path in sorted((REPO / p.folder).rglob("*.py")):
            for bad in sorted(imported_packages(path) - allowed):
                wrong.append(f"{path.relative_to(REPO)} imports {bad}")
    assert not wrong, "imports against the layout (tests/test_layout.py):\n" + "\n".join(wrong)


def test_nothing_imports_the_command_line() -> None:
    users = [str(path.relative_to(REPO)) for p in LAYOUT if p.folder not in ("cli", "tests", "bench")
             for path in (REPO / p.folder).rglob("*.py") if "cli" in imported_packages(path)]
    assert not users


def test_every_python_package_is_in_the_table() -> None:
    on_disk = {p.parent.name for p in REPO.glob("*/__init__.py")} | {"tests"}
    assert on_disk == OURS


def test_the_readme_shows_the_table() -> None:
    assert render() in (REPO / "README.md").read_text(), "README.md: paste tests/test_layout.py's render()"


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("import os\nfrom cli.main import main\n\ndef f():\n    import store.paths\n")
    assert imported_packages(bad) == {"cli", "store"}


def test_mypy_checks_every_package_and_the_tests() -> None:
    """``make lint`` runs ``mypy --strict`` on what pyproject.toml lists: all of the table."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True
    assert set(config["files"]) == OURS
    assert "exclude" not in config, "nothing is left out of mypy"
