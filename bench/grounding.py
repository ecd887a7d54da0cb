"""Step 3 of a run's rationales, grounded in the catalog and scored as a recommender.

    .venv/bin/python bench/grounding.py --run-dir runs/demo [--role teacher] [--k 10] [--reground]
        [--encoder all-minilm-l6-v2 [--min-cosine 0.8]]

For every successful rationale of ``<run-dir>/rationales/<role>`` (a local folder or a storage
URI), the catalog items its Step 3 names (``step3_item_ids``, or grounded here from the Step 3
text with ``--reground`` or when the folder predates grounding), in the order named, are ranked
against the user's test target (the last item of the sequence). Prints HR@k and NDCG@k (a user
whose Step 3 grounds nothing is a miss), the share of rationales whose Step 3 names at least one
catalog item, the share naming an item of the user's training prefix and of the prefix the
rationale was written from, and a few grounded examples (Step 3 text -> titles and ids).
``--json`` also writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run folder (local path or URI)")
    p.add_argument("--role", default="teacher", choices=["teacher", "student"])
    p.add_argument("--k", type=int, default=10, help="cut-off of HR and NDCG")
    p.add_argument("--reground", action="store_true", help="ground the Step 3 text again instead of "
                   "reading step3_item_ids")
    p.add_argument("--encoder", default=None, help="also ground by nearest title embedding with this "
                   "sentence-transformer (e.g. all-minilm-l6-v2); implies --reground")
    p.add_argument("--min-cosine", type=float, default=0.8, help="the embedding match's least cosine")
    p.add_argument("--examples", type=int, default=5, help="grounded examples to print")
    p.add_argument("--json", default=None, help="also write the figures and examples to this file")
    args = p.parse_args(argv)

    from slim_ray.config import load_config
    from slim_ray.generate.grounding import evaluate_folder

    lay = load_config(None, [f"run_dir={args.run_dir}"]).layout
    rep = evaluate_folder(lay.rationales(args.role), lay.sequences, lay.items, k=args.k,
                          reground=args.reground or bool(args.encoder), n_examples=args.examples,
                          encoder=args.encoder, min_cosine=args.min_cosine)
    m = rep.metrics
    k = args.k

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f} %"

    print(f"{args.role} rationales: {m['rationale_rows']} successful rows, {m['users']} users with a test "
          f"target; catalog of {m['catalog_items']} items")
    print(f"Step 3 as a recommender: HR@{k} {pct(m[f'hr@{k}'])}  NDCG@{k} {pct(m[f'ndcg@{k}'])}")
    print(f"grounded (names >= 1 catalog item): {pct(m['share_grounded'])} of rationales; "
          f"{m['mean_grounded_items'] or 0:.2f} grounded items per rationale")
    print(f"naming history items: {pct(m['share_naming_history'])} of rationales (training prefix), "
          f"{pct(m['share_naming_rationale_prefix'])} (the prefix the rationale read); "
          f"{pct(m['share_items_in_history'])} of grounded items are in the training prefix")
    if m.get("grounded_items_by_match"):
        print("grounded items by match: " + ", ".join(f"{k} {v}" for k, v in sorted(m["grounded_items_by_match"].items())))
    for ex in rep.examples:
        text = " ".join((ex["step3"] or "").split())
        print(f"\nuser {ex['user_id']} (test target {ex['test_target']}: {ex['test_target_title']})")
        print(f"  Step 3: {text[:300]}{'...' if len(text) > 300 else ''}")
        print("  -> " + "; ".join(f"{t} [{i}]" for t, i in zip(ex["titles"], ex["item_ids"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"metrics": m, "examples": rep.examples}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
