"""What basicsr 1.4.2 needs to import and run on today's torch / torchvision: import shims, nothing else.

:func:`apply` runs on ``import dspo_basicsr`` (before any basicsr module is loaded) and is idempotent:

* ``torchvision.transforms.functional_tensor`` (removed in torchvision 0.17, imported by
  ``basicsr/data/degradations.py``) is aliased to its successor ``torchvision.transforms._functional_tensor``.

It replaces no BasicSR function or class: ``import dspo_basicsr`` leaves BasicSR as it found it, apart from
the plugin's classes registered in its registries (``tests/test_leaves_basicsr.py``). What our models and
pipelines need is ours: the base model (:mod:`dspo_basicsr.models.base_model`), the train and test pipelines
(:mod:`dspo_basicsr.train`, :mod:`dspo_basicsr.test`), the safe option reader, process group, registry hints,
data loaders, atomic writer, RNG states and resume selection (:mod:`dspo_basicsr.utils`) and the metric call
with NIQE's minimum size (:mod:`dspo_basicsr.metrics.calculate`).
"""
import sys

_applied = False


def _alias_functional_tensor():
    if 'torchvision.transforms.functional_tensor' in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision still has it)
    except ImportError:
        from torchvision.transforms import _functional_tensor
        sys.modules['torchvision.transforms.functional_tensor'] = _functional_tensor


def apply():
    """Apply every import shim once. Safe to call repeatedly."""
    global _applied
    if _applied:
        return
    _alias_functional_tensor()
    _applied = True
