"""Data: readers for raw logs, preparation into the items/sequences contracts, synthetic logs."""
