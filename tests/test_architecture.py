"""Repository-wide architecture checks: method documentation lives in the repository (docs/methods/) and code cites it
(or the paper), never a specification file outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = "shared" + "/methods"  # split so that this file does not match itself
# `name.md "Section"` (or `name.md, "Section"`) where name.md is not a path (no `/` before it)
BARE_SECTION_CITATION = re.compile(r"(?<![\w/.-])([\w-]+\.md)\)?,? *\"[A-Z][^\"]*\"")
DOCS_LINK = re.compile(r"docs/methods/([\w-]+\.md)(?:#([\w-]+))?")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    files = []
    for name in out:
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".json", ".tsv"} and path.is_file():
            files.append(path)
    return files


def _anchors(page: Path) -> set[str]:
    """GitHub-style heading anchors of a markdown page."""
    anchors = set()
    for line in page.read_text().splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_no_file_cites_specs_outside_the_repository():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in _tracked_text_files()
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE in line]
    assert offenders == [], f"cite docs/methods/<page>.md or the paper instead: {offenders}"


def test_section_citations_name_a_docs_path():
    offenders = []
    for p in _tracked_text_files():
        if p.suffix not in {".py", ".md"} or p == Path(__file__).resolve():
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in BARE_SECTION_CITATION.finditer(line):
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {m.group(0)}")
    assert offenders == [], f"cite docs/<page>.md (docs/methods/<page>.md#anchor) instead: {offenders}"


def test_docs_methods_links_resolve():
    pages = ROOT / "docs" / "methods"
    broken = []
    for p in _tracked_text_files():
        if p == ROOT / "docs" / "contributing.md":  # its worked examples name pages a contributor would add
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in DOCS_LINK.finditer(line):
                page, anchor = pages / m.group(1), m.group(2)
                if not page.is_file() or (anchor and anchor not in _anchors(page)):
                    broken.append(f"{p.relative_to(ROOT)}:{i}: {m.group(0)}")
    assert broken == [], broken


def test_the_citation_checks_catch_offenders():
    assert BARE_SECTION_CITATION.search('see npo.md "TOFU metrics" here')
    assert BARE_SECTION_CITATION.search('(wpo.md, "Weights")')
    assert not BARE_SECTION_CITATION.search('docs/rlvr.md "Tool calling"')


# --------------------------------------------------------------------------------------------------------------------
# Registries drive dispatch: no name comparisons outside them, and every entry is documented, used and tested
# --------------------------------------------------------------------------------------------------------------------

def _registries():
    from posttrain.adapters.spec import ADAPTER_VARIANTS
    from posttrain.families.preference.trainer import PREFERENCE_LOSSES
    from posttrain.families.rl.parts import ADVANTAGES, AGGREGATIONS, CLIPPINGS
    from posttrain.families.sft.forward import SFT_LOSSES
    from posttrain.families.unlearning.objective import UNLEARNING_OBJECTIVES

    return {"advantage": ADVANTAGES, "aggregation": AGGREGATIONS, "clipping": CLIPPINGS,
            "preference": PREFERENCE_LOSSES, "sft": SFT_LOSSES, "unlearning": UNLEARNING_OBJECTIVES,
            "peft.type": ADAPTER_VARIANTS}


# What a comparison selects on: the last name of the compared expression (`p.advantage`, `peft.type`, `kind`,
# `agg.normalizer`, `peft_type(recipe)`, ...), leading underscores dropped.
SELECTORS = {"name", "method", "family", "reference", "type", "peft_type", "kind", "adapter", "variant", "advantage",
             "aggregation", "clipping", "loss", "loss_type", "trl_loss_type", "normalizer", "forget", "retain",
             "objective", "mode"}
# Files that may compare registered names: the registry itself, and the one place the reference modes of
# MethodInfo are turned into a ReferencePlan.
NAME_COMPARISON_HOMES = {"posttrain/registry.py", "posttrain/reference.py"}
# Comparisons still to be replaced by a question to the entry (issue #24), each file + expression. Shrink it; never
# add a file wholesale.
KNOWN_REMAINING: set[tuple[str, str]] = set()


def _mode_strings() -> set[str]:
    """Every registered name or mode string: method, family and part names, the reference modes, the identifier
    values entries declare (normalizers, forget/retain terms, TRL loss types) and the values of the method params'
    selector keys (``loss: pacs``)."""
    import dataclasses
    import typing

    from posttrain.families.base import FAMILIES
    from posttrain.methods import METHODS

    out = set(METHODS) | set(FAMILIES) | {"required", "optional"}  # "none" too, for a `reference` (see below)
    for registry in _registries().values():
        for entry in registry:
            out.add(entry.name)
            values = (getattr(entry, f.name) for f in dataclasses.fields(entry) if f.name != "doc")
            out |= {v for v in values if isinstance(v, str) and re.fullmatch(r"\w+", v)}
    for info in METHODS.values():
        for key, field in info.params.model_fields.items():
            if key in SELECTORS and typing.get_origin(field.annotation) is typing.Literal:
                out |= {v for v in typing.get_args(field.annotation) if isinstance(v, str)}
    return out


def _selector(node) -> str:
    import ast

    while isinstance(node, ast.Call):
        node = node.func
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name.lstrip("_")


def name_comparisons(source: str, modes: set[str]) -> list[tuple[int, str]]:
    """``(line, expression)`` of every ``==`` / ``!=`` / ``in`` / ``not in`` comparison and ``match`` case in
    ``source`` that compares a selector expression (:data:`SELECTORS`) with a registered name or mode string."""
    import ast

    def strings(node) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return [s for e in node.elts for s in strings(e)]
        return []

    def registered(operands) -> bool:
        selectors = {_selector(o) for o in operands}
        wanted = modes | {"none"} if "reference" in selectors else modes  # "none" is a mode only of a reference
        return bool(selectors & SELECTORS) and any(set(strings(o)) & wanted for o in operands)

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            if registered([node.left, *node.comparators]):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Match):
            for case in node.cases:
                values = [p.value for p in ast.walk(case.pattern) if isinstance(p, ast.MatchValue)]
                if registered([node.subject, *values]):
                    found.append((case.pattern.lineno,
                                  f"match {ast.unparse(node.subject)}: case {ast.unparse(case.pattern)}"))
    return found


def test_no_name_comparisons_outside_the_registries():
    modes = _mode_strings()
    offenders, seen = [], set()
    for path in sorted((ROOT / "posttrain").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in NAME_COMPARISON_HOMES:
            continue
        for line, expression in name_comparisons(path.read_text(), modes):
            if (rel, expression) in KNOWN_REMAINING:
                seen.add((rel, expression))
            else:
                offenders.append(f"{rel}:{line}: {expression}")
    assert offenders == [], ("ask the registry entry (the method's MethodInfo / params, the Family, the "
                             "ReferencePlan) instead: " + "\n".join(offenders))
    assert KNOWN_REMAINING <= seen, f"fixed: remove from KNOWN_REMAINING: {sorted(KNOWN_REMAINING - seen)}"


PLANTED = [
    'if kind == "ga":\n    pass\n',  # the unlearning objective before issue #24
    'if p.loss == "pacs":\n    pass\n',
    'if p.aggregation == "dr_grpo":\n    pass\n',  # the GRPO trainer branched on agg.normalizer names before
    'x = peft.type == "goat"\n',
    'if peft_type(recipe) != "goat":\n    pass\n',
    'if method == "poft":\n    pass\n',
    "if self.method in ('dpo', 'wpo'):\n    pass\n",
    'if p.advantage == "group":\n    pass\n',
    'x = p.aggregation != "delta_l"\n',
    'if info.name == "asft_anchored":\n    pass\n',
    'if p.clipping in ("gppo",):\n    pass\n',
    'if info.family == "unlearning":\n    pass\n',
    'if info.reference == "optional":\n    pass\n',
    'if get_method(method).reference == "none":\n    pass\n',
    'match recipe.peft.type:\n    case "plora":\n        pass\n',
]


def test_name_comparison_check_catches_planted_offenders(tmp_path):
    modes = _mode_strings()
    for i, source in enumerate(PLANTED):
        planted = tmp_path / f"planted_{i}.py"
        planted.write_text(source)
        assert len(name_comparisons(planted.read_text(), modes)) == 1, source
    for fine in ('if entry.normalize_then_sum:\n    pass\n', 'if fmt.mode == "auto":\n    pass\n',
                 'if scale == "group":\n    pass\n', 'if family.evaluates_forgetting:\n    pass\n',
                 'if fmt.mode == "none":\n    pass\n'):
        assert name_comparisons(fine, modes) == [], fine


def _recipe_values() -> dict[str, set[str]]:
    """For every registry key: the values the shipped recipes select (defaults included)."""
    from posttrain.recipe import load_recipe

    used: dict[str, set[str]] = {k: set() for k in _registries()}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path, [])
        p, name = recipe.params, recipe.method.name
        for key in ("advantage", "aggregation", "clipping"):
            if hasattr(p, key):
                used[key].add(getattr(p, key))
        for key in ("preference", "sft", "unlearning"):
            used[key].add(name)
        used["peft.type"].add(recipe.peft.type if recipe.peft is not None else None)
    return used


def test_every_registry_entry_is_documented_used_and_tested():
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != Path(__file__).name)
    used = _recipe_values()
    problems = []
    for key, registry in _registries().items():
        assert len(registry) > 0, key
        for entry in registry:
            where = f"{key} {entry.name!r}"
            doc = entry.fn.__doc__ or ""
            if not re.search(r"arXiv:? ?\d{4}\.\d{4,5}", doc):
                problems.append(f"{where}: the docstring of {entry.fn.__qualname__} cites no paper (arXiv id)")
            page = entry.doc.split("#", 1)[0]
            if not page.startswith("docs/methods/") or not (ROOT / page).is_file():
                problems.append(f"{where}: docs page {entry.doc!r} missing")
            if getattr(entry, "recipe_method", True) and entry.name not in used[key]:
                if getattr(entry, "recipe", None) is None:
                    problems.append(f"{where}: no recipe in recipes/ uses it (nor a documented recipe + --set)")
                else:  # a shipped recipe with overrides: it loads and selects the entry
                    from posttrain.recipe import load_recipe

                    path, sets = entry.recipe
                    params = load_recipe(ROOT / path, sets).params
                    if getattr(params, key) != entry.name:
                        problems.append(f"{where}: {path} {sets} does not select it")
            if not re.search(rf"[\"']{re.escape(entry.name)}[\"']", tests_text):
                problems.append(f"{where}: no unit test names it")
    assert problems == [], "\n".join(problems)


def test_schema_values_come_from_the_registries():
    from typing import get_args

    from posttrain.methods import METHODS, GRPOParams

    regs = _registries()
    for key in ("advantage", "aggregation", "clipping"):
        assert get_args(GRPOParams.model_fields[key].annotation) == regs[key].names()
    for family in ("preference", "sft"):
        assert {n for n, i in METHODS.items() if i.family == family} == set(regs[family].names())
    assert {n for n, i in METHODS.items() if i.family == "unlearning"} == {
        e.name for e in regs["unlearning"] if e.recipe_method}


# --------------------------------------------------------------------------------------------------------------------
# Import hygiene
# --------------------------------------------------------------------------------------------------------------------


def _module_names() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "posttrain").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking_only(tree) -> set[int]:
    """The ids of the nodes under ``if TYPE_CHECKING:``: imports only a type checker follows, never run."""
    import ast

    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _import_graph() -> dict[str, set[str]]:
    """posttrain module -> the posttrain modules it imports anywhere (module level or inside functions; not the
    annotation-only imports under ``if TYPE_CHECKING:``)."""
    import ast

    mods = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges: set[str] = set()
        tree = ast.parse(path.read_text())
        skipped = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:  # a name inside a module -> that module
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target.startswith("posttrain") and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_family_imports_another_familys_config():
    """A family's config is its own: what several families' configs share (the ``training.logprob_head`` literal)
    lives below the families (posttrain.registry), not in one family imported by the others."""
    graph = _import_graph()
    family_of = {m: m.split(".")[2] for m in graph if m.startswith("posttrain.families.") and m.count(".") >= 2}
    offenders = sorted(f"{m} imports {t}" for m, targets in graph.items() if m in family_of for t in targets
                       if t.endswith(".config") and t in family_of and family_of[t] != family_of[m]
                       and FAMILY_BUILT_ON.get(family_of[m]) != family_of[t])
    assert offenders == [], offenders


# A family built on another's trainer and config, by design (never for a shared literal or helper).
FAMILY_BUILT_ON = {"online": "rl"}  # online DPO subclasses the GRPO trainer and its RLConfig (docs/logprob_engine.md)


def test_family_config_check_catches_a_planted_offender(monkeypatch):
    import pytest

    planted = {**_import_graph()}
    planted["posttrain.families.sft.config"] = planted["posttrain.families.sft.config"] | {
        "posttrain.families.preference.config"}
    monkeypatch.setattr(sys.modules[__name__], "_import_graph", lambda: planted)
    with pytest.raises(AssertionError, match="sft.config imports posttrain.families.preference.config"):
        test_no_family_imports_another_familys_config()


def test_every_family_config_takes_the_one_logprob_head_literal():
    import dataclasses
    import typing

    from posttrain.families.base import FAMILIES
    from posttrain.logprobs.heads import head_choices
    from posttrain.recipe.training_args import config_class
    from posttrain.registry import LogprobHead

    assert typing.get_args(LogprobHead) == head_choices()
    with_head = {}
    for name in FAMILIES:
        fields = {f.name: f for f in dataclasses.fields(config_class(name))}
        if "logprob_head" in fields:
            with_head[name] = typing.get_type_hints(config_class(name))["logprob_head"]
    assert set(with_head) >= {"preference", "sft", "rl", "unpaired", "unlearning"}
    assert all(hint == LogprobHead for hint in with_head.values()), with_head


def test_no_import_cycles():
    graph = _import_graph()
    assert "posttrain.trainers.common" in graph["posttrain.run.pipeline"]  # the walk sees imports
    assert _cycles(graph) == []


def _folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between units: a subpackage (``posttrain.data``) or a top-level module (``posttrain.train``)."""
    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    return out


# Unit-level imports that point from a lower layer up to a higher one and close the cycles still open (issue #24):
# remove an entry when its imports are gone; never add one.
KNOWN_UPWARD_IMPORTS: set[tuple[str, str]] = set()


def test_no_folder_level_import_cycles():
    folders = _folder_graph(_import_graph())
    stale = {(a, b) for a, b in KNOWN_UPWARD_IMPORTS if b not in folders.get(a, set())}
    assert stale == set(), f"gone: remove from KNOWN_UPWARD_IMPORTS: {sorted(stale)}"
    layered = {a: {b for b in targets if (a, b) not in KNOWN_UPWARD_IMPORTS} for a, targets in folders.items()}
    assert _cycles(layered) == []


def test_every_family_is_registered_once():
    from posttrain import methods
    from posttrain.families.base import FAMILIES
    from posttrain.recipe.training_args import config_class
    from posttrain.registry import load

    assert methods.FAMILIES == tuple(FAMILIES)  # methods.Family / FAMILIES: to be read from posttrain.families
    assert {info.family for info in methods.METHODS.values()} == set(FAMILIES)
    for family in FAMILIES.values():
        for spec in (family.build_config, family.build_trainer, family.preview, family.check_data, family.check_code,
                     family.test_scorer):
            assert spec is None or callable(load(spec)), (family.name, spec)
        assert isinstance(config_class(family.name), type)


def test_importing_the_recipe_schema_imports_no_torch():
    code = "import sys, posttrain.recipe\nprint(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_annotation_imports_are_left_out_of_the_graph():
    import ast

    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from x import A\nelse:\n    import y\n"
                     "def f():\n    import z\n")
    skipped = _type_checking_only(tree)
    imported = {a.name if isinstance(n, ast.Import) else n.module for n in ast.walk(tree)
                if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skipped for a in n.names}
    assert imported == {"typing", "y", "z"}


def test_every_module_imports_in_a_fresh_interpreter():
    code = (
        "import importlib, pkgutil, posttrain\n"
        "bad = []\n"
        "for m in pkgutil.walk_packages(posttrain.__path__, 'posttrain.'):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{m.name}: {exc!r}')\n"
        "print('\\n'.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr[-2000:]


def test_unlearning_objective_defaults_agree_with_the_method_params():
    from posttrain.families.unlearning.objective import UNLEARNING_OBJECTIVES
    from posttrain.methods import METHODS

    for entry in UNLEARNING_OBJECTIVES:
        if not entry.recipe_method:  # ga_kl: a loss-module objective only (docs/methods/npo.md#the-ga_kl-objective)
            assert entry.name not in METHODS
            continue
        params = METHODS[entry.name].params()
        for key in ("gamma", "alpha", "beta", "delta"):
            expected = getattr(entry, key)
            assert getattr(params, key, 0.0 if key in ("alpha", "delta") else None) == expected, (entry.name, key)


# --------------------------------------------------------------------------------------------------------------------
# tests/ mirrors posttrain/: a test lives in the folder of the package it tests
# --------------------------------------------------------------------------------------------------------------------

# Top-level test files that test no one package (besides test_<module>.py for a top-level posttrain/<module>.py,
# which mirrors its module where it is), each with the reason it stays here.
CROSS_CUTTING_TESTS = {
    "test_architecture.py": "the repository's layout, imports and registries",
    "test_add_a_method.py": "the docs/contributing.md walk-through: toy methods of several families through the run",
    "test_cli_recipes.py": "every shipped recipe end to end through the CLI",
    "test_real_recipes.py": "recipes/real/ through preflight, with the adapters they name",
    "test_hostile_input.py": "bad input to every command, family and data format",
    "test_newcomer_edges.py": "a newcomer's first runs: recipe loading, launcher, CLI, logs, paths",
    "test_startup.py": "the whole `posttrain train` process: imports at start, teardown at exit",
    "test_grad_accumulation.py": "gradient accumulation through every family's trainer",
    "test_trl_parity.py": "our trainers against stock TRL and TRL's pinned internals",
    "test_results.py": "benchmarks/results.py, across families",
    "test_variant_costs.py": "benchmarks/variant_costs.py: every registered variant of every family against its baseline",
    "test_check_show.py": "`posttrain check --show` (posttrain/preview.py) for every family",
    "test_model_options.py": "the `model:` / `ref_model:` load options (posttrain/models.py) from recipe to load",
}
# Still at the top level although one package owns them (other engineers edited them while the rest moved): move
# each into its folder and remove it from here; never add one.
NOT_YET_MOVED: dict[str, str] = {}
# tests/ folders that hold helpers, not tests of a package.
HELPER_FOLDERS = {"toy_methods": "the toy methods test_add_a_method.py registers and trains"}


def misplaced_top_level_tests(names: set[str], top_level_modules: set[str]) -> list[str]:
    """The top-level ``tests/test_*.py`` files of ``names`` that belong in a package folder: neither a test of a
    top-level module (``test_<module>.py``) nor a listed cross-cutting or not-yet-moved file."""
    allowed = set(CROSS_CUTTING_TESTS) | set(NOT_YET_MOVED) | {f"test_{m}.py" for m in top_level_modules}
    return sorted(n for n in names if n.startswith("test_") and n.endswith(".py") and n not in allowed)


def unmirrored_test_folders(folders: set[str], packages: set[str]) -> list[str]:
    """The ``tests/`` folders (paths relative to tests/) with no ``posttrain/`` package at the same path."""
    return sorted(f for f in folders if f not in packages and f.split("/", 1)[0] not in HELPER_FOLDERS)


def _top_level_modules() -> set[str]:
    return {p.stem for p in (ROOT / "posttrain").glob("*.py") if p.stem != "__init__"}


def _folders(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_dir() and not any(part.startswith((".", "__")) for part in p.relative_to(root).parts)}


def test_top_level_tests_are_cross_cutting():
    names = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    misplaced = misplaced_top_level_tests(names, _top_level_modules())
    assert misplaced == [], ("put each in tests/<package>/, next to the package it tests (tests/ mirrors posttrain/), "
                             f"or, if it tests no one package, add it to CROSS_CUTTING_TESTS with the reason: {misplaced}")
    listed = set(CROSS_CUTTING_TESTS) | set(NOT_YET_MOVED)
    assert listed <= names, f"gone or moved: remove from the lists: {sorted(listed - names)}"
    assert set(NOT_YET_MOVED.values()) <= _folders(ROOT / "posttrain")


def test_every_test_folder_mirrors_a_package():
    unmirrored = unmirrored_test_folders(_folders(ROOT / "tests"), _folders(ROOT / "posttrain"))
    assert unmirrored == [], f"no posttrain/ package at these tests/ paths (tests/ mirrors posttrain/): {unmirrored}"
    assert all((ROOT / "tests" / f).is_dir() for f in HELPER_FOLDERS)


def test_test_file_names_are_unique():
    """tests/ has no ``__init__.py``: pytest imports each test file by its bare name, so two files of one name in
    different folders stop the second from being collected ("import file mismatch")."""
    seen: dict[str, list[str]] = {}
    for p in (ROOT / "tests").rglob("test_*.py"):
        seen.setdefault(p.name, []).append(p.relative_to(ROOT).as_posix())
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert clashes == {}, f"rename so each test file's name is unique (e.g. test_<family>_<topic>.py): {clashes}"


def test_the_layout_checks_catch_misplaced_tests():
    modules = {"cli", "merge"}
    assert misplaced_top_level_tests({"test_rl_new_reward.py", "test_merge.py", "test_cli_recipes.py",
                                      "conftest.py", "fp32.py"}, modules) == ["test_rl_new_reward.py"]
    packages = {"rl", "data", "families", "families/rl"}
    assert unmirrored_test_folders({"rl", "families", "families/rl", "families/dpo", "utils", "toy_methods"},
                                   packages) == ["families/dpo", "utils"]
    assert TEST_PATH.findall("`tests/families/rl/test_x.py::t` and tests/toy_methods/NAME.py") == [
        "tests/families/rl/test_x.py"]


TEST_PATH = re.compile(r"tests/[a-z0-9_/]+\.py")
# Test paths named in files other engineers owned while the tests moved: point each at the file's new place (the same
# name under tests/<package>/ or tests/families/<family>/) and remove it from here; never add one.
KNOWN_STALE_TEST_PATHS: set[tuple[str, str]] = set()


def test_named_test_files_exist():
    named, stale = set(), []
    for p in _tracked_text_files():
        rel = p.relative_to(ROOT).as_posix()
        if rel == "docs/contributing.md" or p == Path(__file__).resolve():  # contributing.md's worked examples
            continue  # name the test files a contributor would add
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for path in TEST_PATH.findall(line):
                named.add((rel, path))
                if not (ROOT / path).is_file() and (rel, path) not in KNOWN_STALE_TEST_PATHS:
                    stale.append(f"{rel}:{i}: {path}")
    assert stale == [], f"no such test file (tests/ mirrors posttrain/: look under tests/<package>/): {stale}"
    fixed = {(rel, path) for rel, path in KNOWN_STALE_TEST_PATHS if (rel, path) not in named or (ROOT / path).is_file()}
    assert fixed == set(), f"fixed: remove from KNOWN_STALE_TEST_PATHS: {sorted(fixed)}"


# --------------------------------------------------------------------------------------------------------------------
# Family builders hand their trainer the common arguments one way (posttrain.trainers.common.trainer_kwargs)
# --------------------------------------------------------------------------------------------------------------------

COMMON_TRAINER_ARGUMENTS = {"model", "args", "train_dataset", "eval_dataset", "processing_class", "peft_config",
                            "callbacks", "params", "ref_model"}
# Builders that still spell the common arguments out, each with the reason: shrink it.
KNOWN_OWN_ARGUMENTS = {
    "reward": "a sequence-classification model: its own peft task type and no reference model",
}


def builder_spelled_arguments(source: str) -> set[str]:
    """The common trainer arguments (:data:`COMMON_TRAINER_ARGUMENTS`) a builder's source passes by keyword to a
    call instead of through ``**trainer_kwargs(...)``."""
    import ast

    return {k.arg for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
            for k in node.keywords if k.arg in COMMON_TRAINER_ARGUMENTS}


def test_family_builders_take_the_common_arguments_from_trainer_kwargs():
    import inspect
    import textwrap

    from posttrain.families.base import FAMILIES
    from posttrain.registry import load

    offenders, fixed = [], []
    for family in FAMILIES.values():
        source = textwrap.dedent(inspect.getsource(load(family.build_trainer)))
        spelled = builder_spelled_arguments(source)
        if family.name in KNOWN_OWN_ARGUMENTS:
            if not spelled:
                fixed.append(family.name)
        elif spelled or "**trainer_kwargs(" not in source:
            offenders.append(f"{family.build_trainer}: {sorted(spelled)}")
    assert offenders == [], f"pass **trainer_kwargs(ctx, config, train, evals) to make_trainer instead: {offenders}"
    assert fixed == [], f"fixed: remove from KNOWN_OWN_ARGUMENTS: {fixed}"


def test_the_builder_check_sees_spelled_arguments():
    assert builder_spelled_arguments("make_trainer(C, r, model=m, args=c, method=n)") == {"model", "args"}
    assert builder_spelled_arguments("make_trainer(C, r, **trainer_kwargs(ctx, c, t), method=n)") == set()
