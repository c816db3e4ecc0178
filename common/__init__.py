"""Helpers every stage uses (sharding, pipeline, jobs), so that no stage imports another's CLI."""
