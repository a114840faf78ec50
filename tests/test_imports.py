"""The repo's modules import one way, from the foundations up (SPEC sec. 1):

    router, losses, augment, vit -> moe, data -> flags, m2ot, schedule -> checkpoint, report
        -> teacher, probe -> eval -> train -> demo

A module imports only modules to its left (or beside it, without a cycle), counting imports
inside functions too. Read from the source, so a lazy import cannot hide a cycle.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"router": 0, "losses": 0, "augment": 0, "vit": 0, "moe": 1, "data": 1}
LEVEL.update(flags=2, m2ot=2, schedule=2, checkpoint=3, report=3, teacher=4, probe=4, eval=5)
LEVEL.update(train=6, demo=7)


def imports_of(path):
    """Names of this repo's modules that `path` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(LEVEL)


def test_imports_point_one_way():
    graph = {p.stem: imports_of(p) for p in ROOT.glob("*.py") if p.stem in LEVEL}
    assert set(LEVEL) == {p.stem for p in ROOT.glob("*.py")}  # every module has its level
    for module, imported in graph.items():
        for other in imported:
            assert LEVEL[other] <= LEVEL[module], f"{module} imports {other}, which is above it"

    def reaches(start, target, seen=()):
        return any(
            n == target or (n not in seen and reaches(n, target, (*seen, n)))
            for n in graph.get(start, ())
        )

    for module in graph:
        assert not reaches(module, module), f"{module} imports itself back through a cycle"
    assert "train" not in graph["eval"]  # eval rebuilds models from checkpoints' model_args
