"""Imports run down the layers of docs/architecture.md, never up; no private names cross packages;
no module imports a stage's runner module.

The layers, lowest first (a module may import its own layer and the ones below):
  0 foundation   configbase, storage, layout, lineage, errors, assets, runtime, stagelog, _ray_compat
  1 configs      every stage's ``config`` module and ``slim_ray.config`` (the pipeline config)
  2 prompts, data
  3 stages       generate, distill, encode, rec, report
  4 serving      serve (hosts what the stages made)
  5 the table    stages, pipeline, plan
  6 entry        cli, __main__ (and jobs/, bench/ outside the package)
No module imports a stage's runner (``<package>.stage``) but the stage table, which does it by
name: stages talk through files, and shared code (engines, encoders, models) lives outside it.
"""

from __future__ import annotations

import ast
import os


PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "slim_ray")

LAYERS = {
    **{m: 0 for m in ("configbase", "storage", "layout", "lineage", "errors", "assets", "runtime",
                      "stagelog", "_ray_compat", "__init__")},
    "config": 1,
    "prompts": 2, "data": 2,
    **{m: 3 for m in ("generate", "distill", "encode", "rec", "report")},
    "serve": 4,
    **{m: 5 for m in ("stages", "pipeline", "plan", "scale")},
    "cli": 6, "__main__": 6,
}
CONFIGS = 1


def layer(module: str) -> int:
    """The layer of a dotted module name; a package's ``config`` module is in the configs layer."""
    if module.endswith(".config") and module.count(".") == 2:
        return CONFIGS
    return LAYERS.get(_top(module), 0)


def _top(module: str) -> str:
    """'slim_ray.generate.stage' -> 'generate'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(path: str, module: str):
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target, [a.name for a in node.names]


def violations() -> list[str]:
    out = []
    for module, path in _modules():
        src = _top(module)
        if src not in LAYERS:
            out.append(f"{module}: not in any layer (add it to docs/architecture.md and LAYERS)")
            continue
        for line, target, names in _imports(path, module):
            if not target.startswith("slim_ray"):
                continue
            where = f"{os.path.relpath(path, os.path.dirname(PKG))}:{line}"
            targets = [target] if target != "slim_ray" else [f"slim_ray.{n}" for n in names]
            for t in targets:
                dst = _top(t)
                if layer(t) > layer(module):
                    out.append(f"{where}: {module} (layer {layer(module)}) imports {t} (layer {layer(t)})")
                if t.endswith(".stage") and src not in ("stages",) and dst != src:
                    out.append(f"{where}: imports the stage runner {t}")
            if dst_private := [n for n in names if n.startswith("_") and not n.startswith("__")]:
                if _top(target) != src and target != "slim_ray._ray_compat":
                    out.append(f"{where}: imports private {dst_private} from {target}")
    return out


def test_imports_run_down_the_layers():
    found = violations()
    assert not found, "\n".join(found)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself bites: a data module importing the CLI is reported."""
    fake = tmp_path / "slim_ray"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "bad.py").write_text("from slim_ray.cli import main\nfrom slim_ray.rec.train import _x\n")
    monkeypatch.setattr(__import__(__name__), "PKG", str(fake))
    found = violations()
    assert any("slim_ray.data.bad (layer 2) imports slim_ray.cli (layer 6)" in v for v in found), found
    assert any("imports private ['_x']" in v for v in found), found
