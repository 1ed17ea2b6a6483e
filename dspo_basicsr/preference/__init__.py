"""Preference sets: samples, the LMDB writer and reader, and the tools that build them."""
