"""Thurstone scaling of SR methods and MAD-competition image selection."""
