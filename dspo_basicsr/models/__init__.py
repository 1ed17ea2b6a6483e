"""BasicSR models (DSPOModel, RankCalibrationModel).

Every `*_model.py` file in this folder is imported here, which registers its classes in BasicSR's registry.
"""
import os

from dspo_basicsr.registration import import_modules_with_suffix

_modules = import_modules_with_suffix(__name__, os.path.dirname(os.path.abspath(__file__)), '_model.py')
