"""Registry lookups of our pipelines and option checks: a name that is not registered gets a hint.

BasicSR's ``Registry.get`` says only that the name was not found (and prints a line when it tries the
``_basicsr`` suffix). :func:`registry_get` finds the same objects and, for a name that is not there, names
the registry and the closest registered names. BasicSR's ``Registry`` itself is left as it is.
"""
import difflib

__all__ = ['registry_get']


def registry_get(registry, name, suffix='basicsr'):
    """``registry.get(name)`` with a hint when ``name`` is not registered.

    Args:
        registry (basicsr.utils.registry.Registry): e.g. ``ARCH_REGISTRY``.
        name (str): The registered name (an option file's ``type``).
        suffix (str): As BasicSR's ``get``, ``<name>_<suffix>`` is tried too.

    Returns:
        The registered class or function.

    Raises:
        KeyError: ``name`` is not registered; the message names the registry and up to five close names.
    """
    if name in registry:
        return registry.get(name)
    if suffix and f'{name}_{suffix}' in registry:
        return registry.get(f'{name}_{suffix}')
    registered = [key for key, _ in registry]
    close = difflib.get_close_matches(str(name), registered, n=5, cutoff=0.5)
    hint = f" Closest registered names: {', '.join(close)}." if close else ''
    raise KeyError(f"No object named '{name}' found in the '{registry._name}' registry.{hint} "
                   "Check the 'type' in the option file, or import the module that registers it.")
