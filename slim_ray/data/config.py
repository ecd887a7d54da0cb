"""Configs of the data stages (prepare, synth). The field descriptions are the documentation."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from slim_ray.configbase import StageConfig

# Logical column names the readers understand; ``columns`` maps them to the names in the files.
LOGICAL_COLUMNS = (
    "user", "item", "timestamp", "rating",  # interactions
    "item_key", "title", "categories", "brand", "year", "description",  # item metadata
)


class PrepareConfig(StageConfig):
    """Raw logs -> the ``items`` and ``sequences`` contracts (k-core, dense ids, time order)."""

    source: Literal["movielens", "atomic", "amazon", "tabular"] = Field(
        "movielens",
        description="Raw format. movielens: the packaged MovieLens-100K RecBole files (or your own "
        "ml-* atomic files via `interactions`/`items`); atomic: any RecBole atomic pair "
        "(.inter + .item, tab-separated, typed headers like `user_id:token`); amazon: Amazon "
        "Reviews JSON lines (reviews + metadata, plain or .gz); tabular: Parquet or CSV with the "
        "column names given in `columns`.",
    )
    dataset: str = Field(
        "ml-100k", description="Packaged dataset used when source=movielens and `interactions` is unset."
    )
    interactions: Optional[str] = Field(
        None,
        description="Interaction log: a file, a folder (every file inside, sorted by name) or a glob. "
        "For amazon: the reviews JSON lines (e.g. Video_Games.json.gz).",
    )
    items: Optional[str] = Field(
        None,
        description="Item metadata: file, folder or glob (amazon: meta_*.json[.gz]; atomic: the .item "
        "file). Optional: items without metadata get their key as title.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Logical -> physical column names, overriding the source's defaults. Logical names: "
        "user, item, timestamp, rating (interactions); item_key, title, categories, brand, year, "
        "description (items). Defaults: movielens user_id/item_id/timestamp/rating and "
        "item_id/movie_title/class/release_year; amazon reviewerID/asin/unixReviewTime/overall and "
        "asin/title/category/brand/description; tabular: the logical names themselves.",
    )
    delimiter: Optional[str] = Field(
        None, description="Field delimiter of text tables (default: tab for atomic, ',' for CSV)."
    )
    list_separator: Optional[str] = Field(
        None,
        description="Separator inside a list-valued text field such as categories (default: space "
        "for atomic token_seq fields, '|' for CSV).",
    )
    min_rating: Optional[float] = Field(
        None, description="Keep only interactions with rating >= this (None: keep all, implicit feedback)."
    )
    min_user_count: int = Field(
        5, ge=1, description="k-core: a user needs at least this many interactions (applied iteratively "
        "with min_item_count until stable). Values below 3 act as 3: leave-one-out needs 3.",
    )
    min_item_count: int = Field(
        5, ge=1, description="k-core: an item needs at least this many interactions (iterative, see above)."
    )
    max_seq_len: Optional[int] = Field(
        200, ge=3, description="Keep only each user's most recent interactions (after k-core). None: all."
    )
    max_users: Optional[int] = Field(
        None, ge=1, description="Take only the first N users (in user-key order, numeric keys "
        "numerically) before filtering: a quick slice of a large log."
    )
    dedup: bool = Field(
        False, description="Drop repeated (user, item, timestamp) rows, keeping the first in file order."
    )
    on_bad_lines: Literal["error", "skip"] = Field(
        "error",
        description="error: stop at the first malformed line/value with file, line and field; skip: drop "
        "it and report the count (and the first examples) in the stage summary.",
    )
    text_fields: list[Literal["title", "year", "categories", "brand", "description"]] = Field(
        default_factory=lambda: ["title", "year", "categories", "brand"],
        description="What the rendered item `text` contains, in this order.",
    )
    max_title_chars: int = Field(200, ge=10, description="Longer titles are cut (some metadata holds HTML).")
    max_description_chars: int = Field(300, ge=0, description="Cut of the description when it is rendered.")
    chunk_mb: int = Field(
        128, ge=1, description="Plain text files are read in byte ranges of this size, in parallel (each "
        "range is one block: fewer, larger blocks make the vocabulary lookups cheaper).",
    )
    shuffle: Literal["sort", "hash"] = Field(
        "sort",
        description="Ray Data shuffle that groups user buckets: sort (pull-based sort shuffle; measured "
        "faster on small nodes) or hash (hash shuffle with aggregator actors; for big clusters).",
    )
    num_buckets: Optional[int] = Field(
        None, ge=1, description="User buckets of the shuffle (default: about one per 500k interactions)."
    )

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(LOGICAL_COLUMNS))
        if unknown:
            raise ValueError(f"unknown logical column(s) {unknown}; known: {list(LOGICAL_COLUMNS)}")
        return v

    @model_validator(mode="after")
    def _paths_needed(self) -> "PrepareConfig":
        if self.source in ("atomic", "amazon", "tabular") and not self.interactions:
            raise ValueError(f"source={self.source} needs `interactions` (path of the raw log)")
        return self


class SynthConfig(StageConfig):
    """Synthetic Amazon-format (or Parquet) logs at scale, so large runs need no download."""

    num_users: int = Field(1000, ge=1, description="Number of users to generate.")
    num_items: Optional[int] = Field(
        None, ge=10, description="Catalogue size (default: num_users // 10, at least 100)."
    )
    out: str = Field("runs/synth", description="Output folder (reviews/ and meta/ shards go inside).")
    format: Literal["amazon", "parquet"] = Field(
        "amazon", description="amazon: JSON lines like Amazon Reviews 2018; parquet: the tabular layout."
    )
    compress: bool = Field(False, description="gzip the amazon JSON shards (.json.gz).")
    seed: int = Field(0, description="Seed; the same seed and sizes give byte-identical output.")
    zipf_exponent: float = Field(
        1.05, gt=0.0, description="Item popularity ~ rank^-s (Amazon categories fit s around 0.9-1.2)."
    )
    length_distribution: Literal["lognormal", "geometric"] = Field(
        "lognormal", description="Per-user sequence length distribution (before the minimum)."
    )
    mean_length: float = Field(20.0, gt=1.0, description="Mean interactions per user.")
    length_sigma: float = Field(0.8, gt=0.0, description="Lognormal sigma of the length (heavy tail).")
    min_length: int = Field(5, ge=1, description="Every user gets at least this many interactions.")
    max_length: int = Field(500, ge=1, description="Cap on interactions per user.")
    start_time: int = Field(1262304000, description="Earliest unix time (2010-01-01).")
    end_time: int = Field(1538352000, description="Latest unix time (2018-10-01).")
    num_shards: Optional[int] = Field(
        None, ge=1, description="Output shards (default: one per 50k users); one Ray task each."
    )
    categories: list[str] = Field(
        default_factory=lambda: [
            "Action", "Adventure", "Role-Playing", "Strategy", "Sports", "Racing", "Puzzle",
            "Simulation", "Shooter", "Fighting", "Platformer", "Music", "Horror", "Family",
            "Accessories", "Controllers", "Headsets", "Storage", "Cables", "Cases",
        ],
        description="Leaf category vocabulary (items get one or two, under a root category).",
    )
    root_category: str = Field("Video Games", description="First entry of every item's category list.")
    brands: list[str] = Field(
        default_factory=lambda: [
            "Nintendo", "Sony", "Microsoft", "Sega", "Capcom", "Ubisoft", "Electronic Arts",
            "Activision", "Bandai Namco", "Square Enix", "Konami", "Bethesda", "Razer",
            "Logitech", "Turtle Beach", "PowerA", "Mad Catz", "HORI", "8BitDo", "Atari",
        ],
        description="Brand vocabulary.",
    )
    title_words: list[str] = Field(
        default_factory=lambda: [
            "Legend", "Dragon", "Star", "Shadow", "Quest", "Racer", "Kingdom", "Galaxy", "Ninja",
            "Knight", "Storm", "Empire", "Hero", "Dungeon", "Pixel", "Turbo", "Ultimate", "Chronicles",
            "Rising", "Arena", "Tactics", "Frontier", "Odyssey", "Blade", "Phantom", "Rebellion",
            "Wireless", "Pro", "Edition", "Deluxe", "Controller", "Headset", "Charger", "Case",
        ],
        description="Words titles are drawn from.",
    )
    dup_rate: float = Field(0.0, ge=0.0, le=0.5, description="Fraction of users whose log has an exact duplicate row.")

    @model_validator(mode="after")
    def _lengths(self) -> "SynthConfig":
        if self.max_length < self.min_length:
            raise ValueError("max_length must be >= min_length")
        if self.end_time <= self.start_time:
            raise ValueError("end_time must be after start_time")
        return self
