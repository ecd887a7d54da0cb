"""A tiny run folder for the serving tests: 12 real movie descriptions, 3 users, embeddings from
the real packaged encoder, and (optionally) a SASRec ``slim:student`` run built by slim_ray.rec."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from slim_ray.data.schemas import ITEMS_SCHEMA, SEQUENCES_SCHEMA
from slim_ray.encode import store
from slim_ray.encode.encoder import EncoderSpec, encode_texts

MOVIES = [
    "Star Wars (1977). Genres: Action, Adventure, Sci-Fi, War.",
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    "Sleepless in Seattle (1993). Genres: Comedy, Romance.",
    "Alien (1979). Genres: Action, Horror, Sci-Fi, Thriller.",
    "Fargo (1996). Genres: Crime, Drama, Thriller.",
    "The Empire Strikes Back (1980). Genres: Action, Adventure, Sci-Fi, War.",
    "Aladdin (1992). Genres: Animation, Children's, Comedy, Musical.",
    "When Harry Met Sally... (1989). Genres: Comedy, Romance.",
    "Aliens (1986). Genres: Action, Sci-Fi, Thriller, War.",
    "Pulp Fiction (1994). Genres: Crime, Drama.",
    "Return of the Jedi (1983). Genres: Action, Adventure, Romance, Sci-Fi, War.",
    "The Lion King (1994). Genres: Animation, Children's, Musical.",
]
HISTORIES = {1: [1, 4, 9, 6], 2: [2, 7, 12], 3: [3, 8, 5, 10]}
STORED_RATIONALE = "Step 1: the user loves space opera and science fiction adventures with wars in space."


def write_rationales(cfg) -> None:
    """User 1's stored student rationale text (the rationales contract): what explain=true returns."""
    from slim_ray.data.schemas import RATIONALES_SCHEMA

    folder = cfg.layout.rationales("student")
    os.makedirs(folder, exist_ok=True)
    row = {c: [None] for c in RATIONALES_SCHEMA.names}
    row.update(rationale_key=["k1"], user_id=[1], role=["student"], prefix_len=[2], text=[STORED_RATIONALE])
    pq.write_table(pa.Table.from_pydict(row, schema=RATIONALES_SCHEMA), os.path.join(folder, "part-0.parquet"))


def write_embeddings(folder: str, kind: str, ids: list[int], texts: list[str], cfg) -> None:
    """Vectors in the embeddings contract, exactly as the encode stage writes them."""
    spec = EncoderSpec.from_config(cfg.encode)
    vecs = encode_texts(texts, dtype=cfg.encode.dtype)
    os.makedirs(folder, exist_ok=True)
    store.write_part(pa.Table.from_arrays([
        pa.array(ids, pa.int64()), pa.array([kind] * len(ids)), pa.array([spec.model_id] * len(ids)),
        pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1]),
        pa.array([spec.key(t) for t in texts]),
    ], schema=store.output_schema(vecs.shape[1])), folder)


def write_run(cfg) -> None:
    lay = cfg.layout
    ids = list(range(1, len(MOVIES) + 1))
    os.makedirs(lay.items)
    pq.write_table(pa.Table.from_pydict({
        "item_id": ids, "item_key": [str(i) for i in ids], "title": [m.split(" (")[0] for m in MOVIES],
        "categories": [m.split("Genres: ")[1].rstrip(".").split(", ") for m in MOVIES],
        "brand": [None] * len(ids), "year": [int(m.split(" (")[1][:4]) for m in MOVIES], "text": MOVIES,
    }, schema=ITEMS_SCHEMA), os.path.join(lay.items, "part-0.parquet"))
    os.makedirs(lay.sequences)
    users = sorted(HISTORIES)
    pq.write_table(pa.Table.from_pydict({
        "user_id": users, "user_key": [str(u) for u in users], "item_ids": [HISTORIES[u] for u in users],
        "timestamps": [list(range(len(HISTORIES[u]))) for u in users],
    }, schema=SEQUENCES_SCHEMA), os.path.join(lay.sequences, "part-0.parquet"))
    write_embeddings(lay.item_embeddings, "item", ids, MOVIES, cfg)
    write_embeddings(lay.user_embeddings("student"), "user", [1], [STORED_RATIONALE], cfg)
    write_rationales(cfg)


def write_checkpoint(cfg, best_valid: float = 0.5, seed: int = 0) -> str:
    """A SASRec slim:student run folder built by slim_ray.rec's own code (model.pt + meta.json with
    the keys train_one writes). Untrained weights: the tests compare serving with the model itself."""
    import torch

    from slim_ray.rec.checkpoint import write_run as publish
    from slim_ray.rec.train import build_model, load_data, run_spec

    spec = run_spec(cfg, "sasrec", "slim", "student", seed)
    torch.manual_seed(seed)
    data = load_data(spec)
    model, _ = build_model(spec, data)
    run_dir = cfg.layout.rec_run("sasrec", "slim", seed, "student")
    meta = {**{k: spec[k] for k in ("backbone", "mode", "role", "variant", "seed", "hp", "fingerprint",
                                    "missing_rationale", "max_users")},
            "best_valid_ndcg@10": best_valid, "n_items": data.n_items, "max_user_id": data.n_users}
    publish(run_dir, model.state_dict(), meta)
    return run_dir
