"""utils: the one option-file reader and the one image reader."""
import cv2
import numpy as np
import pytest

from dspo_basicsr.utils.image_io import read_rgb
from dspo_basicsr.utils.options import OptionFileError, read_option_file


def test_option_reader_keeps_order_refuses_tags_and_checks_required_keys(tmp_path):
    chain = tmp_path / 'chain.yml'
    chain.write_text('sampling: {steps: 4}\nframework: {type: X}\n', encoding='utf-8')
    assert list(read_option_file(str(chain), require=())) == ['sampling', 'framework']
    with pytest.raises(OptionFileError, match="has no 'name' key"):
        read_option_file(str(chain))
    evil = tmp_path / 'evil.yml'
    evil.write_text('name: x\nmodel_type: !!python/object/apply:os.system ["true"]\n', encoding='utf-8')
    with pytest.raises(OptionFileError, match=r'evil.yml.*line 2'):
        read_option_file(str(evil))


def test_cli_re_exports_the_reader():
    from dspo_basicsr import cli
    assert cli.read_option_file is read_option_file and cli.OptionFileError is OptionFileError


def test_read_rgb_crops_converts_and_names_bad_files(tmp_path):
    image = np.zeros((6, 8, 3), np.uint8)
    image[..., 2] = 255  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / 'red.png'), image)
    rgb = read_rgb(str(tmp_path / 'red.png'), crop_size=4)
    assert rgb.shape == (3, 4, 4) and rgb[0].min() == 1 and rgb[1:].max() == 0
    with pytest.raises(ValueError, match='smaller than crop_size 7'):
        read_rgb(str(tmp_path / 'red.png'), crop_size=7)
    with pytest.raises(FileNotFoundError, match='missing.png'):
        read_rgb(str(tmp_path / 'missing.png'))
    (tmp_path / 'text.png').write_text('not an image')
    with pytest.raises(ValueError, match='text.png.*not a readable image'):
        read_rgb(str(tmp_path / 'text.png'))


def test_atomic_write_flushes_to_disk_and_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import os

    import torch

    from dspo_basicsr.utils.atomic_write import atomic_json_dump, atomic_torch_save, atomic_write
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / 'net_g_2.pth'
    atomic_torch_save({'params': {'w': torch.ones(2)}}, path)
    atomic_json_dump({'iter': 2}, tmp_path / 'record.json', indent=2)
    assert len(synced) == 2 and (tmp_path / 'record.json').read_text() == '{\n  "iter": 2\n}'

    def killed_halfway(f):
        f.write(b'PK\x03\x04 half')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), killed_halfway)
    assert torch.equal(torch.load(path, weights_only=True)['params']['w'], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ['net_g_2.pth', 'record.json']


def test_registry_get_names_the_closest_and_leaves_basicsrs_get_alone():
    import dspo_basicsr  # noqa: F401  (fills the registries)
    from dspo_basicsr.utils.registry import registry_get

    from basicsr.utils.registry import ARCH_REGISTRY
    assert registry_get(ARCH_REGISTRY, 'MSRResNet') is ARCH_REGISTRY.get('MSRResNet')
    with pytest.raises(KeyError, match=r"'MSRResNt' found in the 'arch' registry. Closest registered names: MSRResNet"):
        registry_get(ARCH_REGISTRY, 'MSRResNt')
    with pytest.raises(KeyError) as basicsrs:
        ARCH_REGISTRY.get('MSRResNt')
    assert 'Closest' not in str(basicsrs.value)
