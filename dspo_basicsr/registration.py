"""Registration by file suffix, as BasicSR does it: adding a method is adding a file."""
import importlib
import os


def import_modules_with_suffix(package, folder, suffix):
    """Import every module ``<folder>/*<suffix>`` of ``package``, in name order.

    Importing a module runs its ``@..._REGISTRY.register()`` decorators.

    Args:
        package (str): Dotted name of the package, e.g. ``'dspo_basicsr.archs'``.
        folder (str): Folder of that package.
        suffix (str): File-name ending such as ``'_arch.py'``.

    Returns:
        list: The imported modules.
    """
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(suffix))
    return [importlib.import_module(f'{package}.{name}') for name in names]
