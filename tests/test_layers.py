"""The packages and top-level modules of phivlm import one another without cycles (lazy imports inside functions
included), and inference, serving, evaluation and export load models through ``phivlm.loading``, not ``train``."""
from __future__ import annotations

import ast
from pathlib import Path

import phivlm

SRC = Path(phivlm.__file__).parent


def _unit(module: str) -> str:
    """``phivlm.train.loop`` -> ``train``; ``phivlm.infer`` -> ``infer``; ``phivlm`` itself -> ``phivlm``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The phivlm modules (or the names imported from them) that ``path`` imports, as absolute names."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "phivlm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "phivlm":
                continue
            for a in node.names:  # ``from . import state`` imports a module, ``from .. import __version__`` a name
                sub = SRC.parent.joinpath(*module.split("."), a.name)
                found.add(f"{module}.{a.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else module)
    return found


def package_graph() -> dict[str, set[str]]:
    """unit -> the other units it imports."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        unit = _unit(_module_name(path))
        graph.setdefault(unit, set()).update(u for u in map(_unit, _imports(path)) if u != unit)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_the_graph_is_read_from_the_sources():
    graph = package_graph()
    assert {"train", "loading", "export", "infer", "serve", "evaluate", "models", "data", "hf"} <= set(graph)
    assert "loading" in graph["train"] and "models" in graph["loading"]  # imports at the top of a module
    assert "phivlm" in graph["export"]  # ``from .. import __version__``
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_two_packages_import_each_other():
    assert _cycle(package_graph()) is None


def test_inference_serving_evaluation_and_export_load_through_loading():
    graph = package_graph()
    for unit in ("infer", "serve", "evaluate", "export"):
        assert "train" not in graph[unit], unit
    assert "loading" in graph["infer"] and "loading" in graph["export"]
    assert "train" not in graph["loading"]
