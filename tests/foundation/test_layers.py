"""Imports run down the layers of docs/architecture.md, never up; no private names cross packages;
no module imports a stage's runner module.

The layers, lowest first (a module may import its own layer and the ones below):
  0 foundation   configbase, storage, layout, lineage, errors, assets, runtime, stagelog, _ray_compat
  1 prompts, data
  2 stages       generate, distill, encode, rec, report
  3 serving      serve (hosts what the stages made)
  4 the table    config (every stage's config), stages, pipeline, plan
  5 entry        cli, __main__ (and jobs/, bench/ outside the package)
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
    "prompts": 1, "data": 1,
    **{m: 2 for m in ("generate", "distill", "encode", "rec", "report")},
    "serve": 3,
    **{m: 4 for m in ("config", "stages", "pipeline", "plan")},
    "cli": 5, "__main__": 5,
}


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
                if LAYERS.get(dst, 0) > LAYERS[src]:
                    out.append(f"{where}: {src} (layer {LAYERS[src]}) imports {t} (layer {LAYERS[dst]})")
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
    assert any("data (layer 1) imports slim_ray.cli (layer 5)" in v for v in found), found
    assert any("imports private ['_x']" in v for v in found), found
