"""Helpers below the models and the preference pipeline (they import neither): distributed data
sharding, pictures of runs."""
