"""Helpers below every other layer: checkpoints, option files, image I/O, data sharding, pictures of runs."""
