"""The package version, in one module so that lower layers (the set writer) need not import the top package."""
__version__ = '0.1.0'
