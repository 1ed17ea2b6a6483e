"""Helpers shared by every layer (checkpoint reading, option files, image I/O); they import no other subpackage."""
