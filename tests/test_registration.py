"""Importing dspo_basicsr registers exactly these names, none of which collides with BasicSR's own."""
import importlib
import pkgutil

import pytest

import dspo_basicsr  # isort: skip  (first: it adapts basicsr 1.4.2 before basicsr is imported)
import basicsr
from basicsr.utils import registry

OURS = {
    'arch': {'ControlSD2Arch', 'SeeSRArch', 'AddSRArch', 'OSEDiffArch', 'CLIPQualityArch', 'RankCalibratedIQAArch',
             'TinyControlSD2Arch', 'TinySeeSRArch', 'TinyAddSRArch', 'TinyOSEDiffArch'},
    'dataset': {'PreferenceLMDBDataset', 'SRMethodGroupDataset', 'IQAListDataset', 'TwoAFCPairDataset'},
    'loss': {'DSPOLoss', 'DiffusionDPOLoss', 'DiffusionSFTLoss', 'DiffusionDROLoss', 'FidelityLoss'},
    'model': {'DSPOModel', 'DiffusionDROModel', 'OnlineGroupModel', 'RankCalibrationModel'},
    'metric': {'calculate_pyiqa', 'calculate_lpips', 'calculate_dists', 'calculate_musiq', 'calculate_maniqa',
               'calculate_clipiqa', 'calculate_pyiqa_niqe', 'calculate_calibrated_iqa'},
}
REGISTRIES = {'arch': registry.ARCH_REGISTRY, 'dataset': registry.DATASET_REGISTRY, 'loss': registry.LOSS_REGISTRY,
              'model': registry.MODEL_REGISTRY, 'metric': registry.METRIC_REGISTRY}


def test_every_registered_name_of_ours():
    for name, reg in REGISTRIES.items():
        ours = {key for key, obj in reg._obj_map.items() if obj.__module__.startswith('dspo_basicsr')}
        assert ours == OURS[name], name


def test_no_collision_with_basicsr_names():
    # BasicSR's registry refuses a second object under a taken name, so a collision would fail at import:
    # check that it does (and keeps BasicSR's object).
    for name, reg in REGISTRIES.items():
        theirs = {key for key, obj in reg._obj_map.items() if obj.__module__.startswith('basicsr')}
        assert theirs, name  # BasicSR's own registrations are still there
        taken = sorted(theirs)[0]
        with pytest.raises(AssertionError, match=taken):
            reg.register(type(taken, (), {}))
        assert reg.get(taken).__module__.startswith('basicsr')  # the refused object replaced nothing
        # and ours were registered beside BasicSR's, under names of their own
        assert not theirs & OURS[name], name


def test_every_module_of_the_package_imports():
    # Registration by suffix must not hide a module that fails to import.
    for info in pkgutil.walk_packages(dspo_basicsr.__path__, 'dspo_basicsr.'):
        importlib.import_module(info.name)
    assert basicsr.__version__.startswith('1.4.2')


@pytest.mark.slow
def test_import_fills_the_registries_without_importing_diffusion_libraries():
    """The arch files register on import but import diffusers / transformers / peft only to build a network (and
    the metric files pyiqa only to build a metric)."""
    import os
    import subprocess
    import sys
    code = ('import sys, dspo_basicsr\n'
            'from basicsr.utils.registry import ARCH_REGISTRY\n'
            "assert {'ControlSD2Arch', 'SeeSRArch', 'AddSRArch', 'OSEDiffArch'} <= set(ARCH_REGISTRY._obj_map)\n"
            "heavy = ('diffusers', 'transformers', 'peft', 'bitsandbytes', 'pyiqa', 'timm')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n"
            "from dspo_basicsr.archs import image_cross_attention\n"
            "cls = image_cross_attention.ImageCrossAttentionTransformer2DModel\n"
            "print(cls.__module__, cls.__qualname__, 'diffusers' in sys.modules)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=repo,
                            env={**os.environ, 'PYTHONPATH': repo, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        '[]', 'dspo_basicsr.archs.image_cross_attention ImageCrossAttentionTransformer2DModel True']


def test_readme_registration_table_lists_exactly_these_names():
    import os
    import re
    readme = open(os.path.join(os.path.dirname(__file__), '..', 'README.md'), encoding='utf-8').read()
    for name, names in OURS.items():
        row = re.search(rf'^\| {name} \| (.*) \|$', readme, re.M)
        assert row, f'README has no "{name}" row in its registration table'
        assert set(re.findall(r'`(\w+)`', row.group(1))) == names, name
