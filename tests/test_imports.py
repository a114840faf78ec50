"""How the repo's modules may import each other, read from their source (imports inside
functions count too, so a lazy import cannot hide a cycle):

* imports point one way: no module reaches itself back through the modules it imports;
* errors.py, how a mistake becomes one line, imports nothing of ours: every module may use it;
* the TGR core (router, losses, vit, moe, schedule, teacher) imports nothing of M²oT's
  (m2ot.py, m2ot_losses.py, m2ot_measure.py, m2ot_teachers.py, probe.py): a reader of the
  first paper's method meets none of the second's;
* eval.py rebuilds models from checkpoints, never from the trainer;
* train.py meets M²oT through one object, m2ot_hook.py's, and imports none of its other files;
* the house is at most six floors deep;
* loading a model or a teacher goes down the floors once (train → teacher → checkpoint), never
  up through the command line: teacher.py and checkpoint.py reach no flags.py.

These are properties, not a frozen table of levels: a new module only has to keep them.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
TGR_CORE = ["router", "losses", "vit", "moe", "schedule", "teacher"]
M2OT = ["m2ot", "m2ot_flags", "m2ot_hook", "m2ot_losses", "m2ot_measure", "m2ot_teachers", "probe"]


def imports_of(path):
    """Names of this repo's modules that `path` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def reachable(start):
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), list(GRAPH[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH[name])
    return seen


def test_imports_point_one_way():
    for module in GRAPH:
        assert module not in reachable(module), f"{module} imports itself back through a cycle"


def test_errors_is_the_ground_floor():
    assert GRAPH["errors"] == set()


def test_the_tgr_core_imports_nothing_of_m2ot():
    for module in TGR_CORE:
        assert not reachable(module) & set(M2OT), (
            f"{module} reaches {reachable(module) & set(M2OT)}"
        )


def test_eval_does_not_import_the_trainer():
    assert "train" not in reachable("eval")


def test_loading_weights_never_goes_through_the_command_line():
    for module in ("checkpoint", "teacher", "m2ot_teachers"):
        assert "flags" not in reachable(module), f"{module} reaches flags.py"


def floors(module):
    """1 for a module that imports none of ours, else one more than its highest import."""
    return 1 + max((floors(name) for name in GRAPH[module]), default=0)


def test_the_house_has_at_most_six_floors():
    """demo → train → eval → teacher → pretrained → vit is as long as a path may be: a reader
    following an import down never climbs more than six files."""
    assert max(floors(module) for module in GRAPH) <= 6


def test_train_meets_m2ot_through_its_hook_alone():
    assert GRAPH["train"] & set(M2OT) == {"m2ot_hook"}, "train.py imports M²oT's files directly"
