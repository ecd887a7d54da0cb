"""`slim-ray bench scale`: every stage measured from 10k to millions of users (docs/scale.md)."""
