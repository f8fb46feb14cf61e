"""One-way layers: a module of budgetlm imports only modules of its own layer or of a lower one.

LAYERS below is the layer table, the one place it is written (docs/architecture.md, "Layers", describes the
modules and refers here). Lowest first:
- base: errors, the registry, the Metric record, utils, units, progress and the version: no budgetlm imports but
  each other;
- models: handles, sources, the LM protocol, the bundled encoder;
- data: the corpus and the tasks (which score their own items, data/tasks/scorers.py);
- work: everything that transforms, runs or measures a model (methods, train, evaluation, hardware, export,
  decode, rag). Its packages call each other (methods train through train.loop, train.run applies methods,
  hardware's llama.cpp bench exports through export, export reads method configs), so they share one layer;
- studies: experiments (recipes, plan, cells, store, driver) and the bundled recipe files;
- face: the api, the CLI, the report, the budget solver (which reads the store as the report does and runs studies
  through experiments/), and the package itself (`import budgetlm`, `from budgetlm import load`).

Imports are read with `ast`, nothing is executed: every `import` / `from ... import` anywhere in a module counts,
inside functions and under `if TYPE_CHECKING:` too. `from budgetlm import x` is the module budgetlm.x when there is
one, else the package face. Registry entries ("module:attr" strings) are not imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import budgetlm

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "registry", "results", "utils", "units", "progress", "_version")),
    ("models", ("models",)),
    ("data", ("data",)),
    ("work", ("methods", "train", "evaluation", "hardware", "export", "decode", "rag")),
    ("studies", ("experiments", "recipes")),
    ("face", ("api", "cli", "report", "solve", "__init__")),
]
# (importing module, imported module) -> why this upward import stays; none today
EXCEPTIONS: dict[tuple[str, str], str] = {}

ROOT = Path(budgetlm.__file__).resolve().parent
RANK = {part: rank for rank, (_, parts) in enumerate(LAYERS) for part in parts}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The table entry a budgetlm module falls under: its first component below budgetlm ('__init__' for the
    package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(module: str) -> tuple[int, str]:
    part = part_of(module)
    if part not in RANK:
        raise AssertionError(f"{module} is in no layer: add '{part}' to LAYERS in {Path(__file__).name}")
    rank = RANK[part]
    return rank, LAYERS[rank][0]


def imported_modules(tree: ast.AST, module: str, is_package: bool, root: Path = ROOT):
    """(line, budgetlm module) of every budgetlm import in `tree`, the source of `module`."""
    package = module if is_package else module.rpartition(".")[0]
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    for node in sorted(nodes, key=lambda n: (n.lineno, n.col_offset)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "budgetlm" or alias.name.startswith("budgetlm."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "budgetlm":
                for alias in node.names:  # a submodule when there is one, else a name of the package face
                    sub = root / alias.name
                    is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                    yield node.lineno, f"budgetlm.{alias.name}" if is_module else "budgetlm"
            elif target.startswith("budgetlm."):
                yield node.lineno, target


def upward_imports(path: Path, source: str, root: Path = ROOT) -> list[str]:
    """One line per import of `path` (with `source` as its text) that reaches a layer above the module's own."""
    module = module_name(path, root)
    rank, layer = layer_of(module)
    found = []
    for line, target in imported_modules(ast.parse(source, str(path)), module, path.name == "__init__.py", root):
        t_rank, t_layer = layer_of(target)
        if t_rank > rank and (module, target) not in EXCEPTIONS:
            where = path.relative_to(root.parent.parent)
            found.append(f"{where}:{line}: {module} (layer {layer}) imports {target} (layer {t_layer})")
    return found


def modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_no_module_imports_a_higher_layer():
    found = [hit for path in modules() for hit in upward_imports(path, path.read_text(encoding="utf-8"))]
    assert not found, "imports from a higher layer:\n" + "\n".join(found)


def test_every_package_and_module_has_a_layer_and_every_entry_exists():
    placed = {part_of(module_name(p)) for p in modules()}
    missing = sorted(placed - set(RANK))
    assert not missing, f"not in LAYERS: {missing}"
    for part in RANK:
        if part != "__init__":
            assert (ROOT / part).is_dir() or (ROOT / f"{part}.py").is_file(), f"LAYERS names {part}, which is gone"
    assert len(RANK) == sum(len(parts) for _, parts in LAYERS), "a name stands in two layers"


def test_the_exceptions_still_exist():
    """An exception whose import is gone is removed from the list, so the list says only what is true."""
    for (module, target), why in EXCEPTIONS.items():
        assert why, f"{module} -> {target}: say why"
        path = ROOT.parent / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert any(t == target for _, t in imported_modules(tree, module, path.name == "__init__.py")), module


def test_upward_imports_are_found_wherever_they_stand():
    """The check itself: imports inside functions, `import budgetlm`, names of the package face and relative imports
    are found, naming the file, the line and both layers; imports of lower layers and registry strings are not."""
    teacher = ROOT / "methods" / "distill" / "teacher.py"
    source = (
        "import torch\n"
        "from budgetlm.errors import ConfigError\n"
        "from budgetlm import errors, utils\n"
        "from budgetlm.models.sources import load\n"
        "from budgetlm.train.loop import fit\n"
        "ENTRY = 'budgetlm.api:load'\n"
        "def load_teacher(spec):\n"
        "    from budgetlm.api import load\n"
        "    import budgetlm.experiments.plan\n"
        "    return load(spec)\n"
        "import budgetlm\n"
        "from budgetlm import load\n"
        "from ...cli import main\n"
    )
    where = teacher.relative_to(ROOT.parent.parent)  # src/budgetlm/methods/distill/teacher.py in a checkout
    found = upward_imports(teacher, source)
    assert found == [
        f"{where}:8: budgetlm.methods.distill.teacher (layer work) imports budgetlm.api (layer face)",
        f"{where}:9: budgetlm.methods.distill.teacher (layer work) imports budgetlm.experiments.plan (layer studies)",
        f"{where}:11: budgetlm.methods.distill.teacher (layer work) imports budgetlm (layer face)",
        f"{where}:12: budgetlm.methods.distill.teacher (layer work) imports budgetlm (layer face)",
        f"{where}:13: budgetlm.methods.distill.teacher (layer work) imports budgetlm.cli (layer face)",
    ]
    fidelity = ROOT / "data" / "tasks" / "fidelity.py"
    assert upward_imports(fidelity, "from budgetlm.evaluation.scorers import rouge_l\n") == [
        f"{fidelity.relative_to(ROOT.parent.parent)}:1: budgetlm.data.tasks.fidelity (layer data) imports "
        "budgetlm.evaluation.scorers (layer work)"
    ]
    assert upward_imports(ROOT / "cli.py", "import budgetlm\nfrom budgetlm.api import load\n") == []
