"""Helpers below the models: pictures of runs (:mod:`dspo_basicsr.utils.visualization`)."""
