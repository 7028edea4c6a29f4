"""The package's shape: no import cycles, one home for the run layout, a recipe list that validates torch-free."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from medvl.models.base import Recipe
from medvl.models.registry import RECIPES, build_recipe
from medvl.spec import parse_spec

PACKAGE = Path(__file__).resolve().parents[1] / "medvl"
LAYOUT_MODULE = "medvl.runs"
# File names of the run folder: spelled in medvl/runs.py only (docstrings may mention them).
LAYOUT_NAMES = ("train_summary.json", "run_spec.json", "metrics.json", "predictions.jsonl", "report.md",
                "search_settings.json", "base_model.json", "trial_starts.jsonl", "trials.csv", "trials.md",
                "val_loss_curves.png", "job.yaml", "eval_summary.json", "mlflow.db", "mlartifacts", "medvl.log",
                "comparison.md", "comparison.png")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def runtime_imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """medvl modules a module imports at run time: at module level or inside functions, not under TYPE_CHECKING."""
    found: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if is_type_checking_block(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medvl":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "medvl"}
        stack.extend(ast.iter_child_nodes(node))
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_among_medvl_modules():
    modules = package_modules()
    graph = {name: runtime_imports(tree, set(modules)) - {name} for name, tree in modules.items()}
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


# ARCHITECTURE.md's layers, bottom first: a module may import its own layer and the ones before it.
LAYERS = (("storage",), ("runs",), ("spec",), ("tracking",), ("data",), ("models",), ("train",), ("eval",),
          ("tune",), ("validation", "plan"), ("serve",), ("runtime", "submit", "stages", "cli", "resources"))


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return next((i for i, names in enumerate(LAYERS) if part in names), len(LAYERS))


def test_imports_only_go_down_the_layers():
    modules = package_modules()
    upward = sorted(f"{name} → {target}" for name, tree in modules.items()
                    for target in runtime_imports(tree, set(modules)) if layer_of(target) > layer_of(name))
    assert not upward, upward


def string_constants_outside_docstrings(tree: ast.Module) -> list[str]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_run_layout_names_are_spelled_in_one_module_only():
    spelled: dict[str, set[str]] = {}
    for name, tree in package_modules().items():
        for text in string_constants_outside_docstrings(tree):
            for layout_name in LAYOUT_NAMES:
                if layout_name in text:
                    spelled.setdefault(layout_name, set()).add(name)
    assert set(spelled) == set(LAYOUT_NAMES)  # every name is spelled somewhere, so the check is not vacuous
    elsewhere = {layout_name: modules - {LAYOUT_MODULE} for layout_name, modules in spelled.items()
                 if modules - {LAYOUT_MODULE}}
    assert not elsewhere, elsewhere


def test_validate_names_a_wrong_recipe_option_without_importing_torch_or_ray():
    code = (
        "import sys\n"
        "from medvl.cli import main\n"
        "rc = main(['validate', 'jobs/quickstart.yaml', '--set', 'train.finetune=lora'])\n"
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'peft') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "train.finetune" in result.stderr and "blip_caption" in result.stderr, result.stderr
    assert "heavy: []" in result.stdout, result.stdout


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_card_names_a_recipe_class_that_honours_it(name: str):
    card = RECIPES[name]
    spec = parse_spec({"name": "t", "output_dir": "/tmp/unused", "stages": ["train"],
                       "model": {"recipe": name, "preset": "tiny"}, "train": {"finetune": card.finetune[0]},
                       "data": {"task": card.data_task or "caption"}})
    card.check(spec)
    recipe = build_recipe(spec)
    assert isinstance(recipe, Recipe) and recipe.card is card
    assert recipe.task == card.task and recipe.endpoint == card.endpoint
