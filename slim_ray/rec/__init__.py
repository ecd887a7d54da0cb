"""rec stage."""
