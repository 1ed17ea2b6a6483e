"""The one strict local-checkpoint reader: missing files, pickled objects, wrappers, key checks."""
import pytest
import torch
from safetensors.torch import save_file

from dspo_basicsr.utils.checkpoint import check_state_dict_matches, missing_weights_error, read_checkpoint


class Payload:
    """A Python object, which ``weights_only=True`` refuses to unpickle."""


def test_missing_file_names_it_and_where_it_goes(tmp_path):
    path = str(tmp_path / 'ram_swin_large_14m.pth')
    with pytest.raises(FileNotFoundError, match='RAM checkpoint: expected the file .*ram_swin_large_14m.pth'):
        read_checkpoint(path, 'RAM checkpoint')
    error = missing_weights_error(str(tmp_path), 'unet/config.json', 'SeeSR')
    assert "'unet/config.json' under" in str(error) and 'Nothing is downloaded' in str(error)


def test_reads_torch_and_safetensors_and_unwraps(tmp_path):
    state = {'w': torch.arange(4.0)}
    torch.save({'params': state, 'iter': 3}, tmp_path / 'net_g.pth')
    save_file(state, str(tmp_path / 'net.safetensors'))
    for name in ('net_g.pth', 'net.safetensors'):
        assert torch.equal(read_checkpoint(str(tmp_path / name))['w'], state['w'])
    kept = read_checkpoint(str(tmp_path / 'net_g.pth'), unwrap=())
    assert set(kept) == {'params', 'iter'}


def test_pickled_objects_are_refused(tmp_path):
    torch.save({'w': Payload()}, tmp_path / 'evil.pth')
    with pytest.raises(ValueError, match='more than tensors.*weights_only'):
        read_checkpoint(str(tmp_path / 'evil.pth'), 'LoRA')
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    with pytest.raises(ValueError, match='not a state dict'):
        read_checkpoint(str(tmp_path / 'list.pth'))


def test_key_check_lists_a_few_keys_then_a_count():
    expected = {f'layer{i}.weight': torch.zeros(2) for i in range(8)}
    state = {'extra.weight': torch.zeros(2)}
    with pytest.raises(KeyError) as info:
        check_state_dict_matches(expected, state, 'net.pth', 'the UNet', hint='Check the folder.')
    message = str(info.value)
    assert 'layer0.weight' in message and 'layer7.weight' not in message and '(8 in all)' in message
    assert 'extra.weight' in message and 'Check the folder.' in message
    with pytest.raises(ValueError, match=r"'layer0.weight' has shape \(3,\)"):
        check_state_dict_matches({'layer0.weight': torch.zeros(2)}, {'layer0.weight': torch.zeros(3)}, 'f', 'net')
    check_state_dict_matches(expected, dict(expected), 'f', 'net')


def test_data_steps_load_a_fine_tuned_framework_strictly(tmp_path):
    """build_framework (the data steps' loader) checks every key of a trained net_g file."""
    import dspo_basicsr  # noqa: F401  (registers the archs)
    from dspo_basicsr.preference.pipeline import build_framework

    network = {'type': 'TinyControlSD2Arch'}
    trained = build_framework({'network': network}).trainable_state_dict()
    trained = {name: value + 0.5 for name, value in trained.items()}
    path = str(tmp_path / 'net_g_10.pth')
    torch.save({'params': trained}, path)
    loaded = build_framework({'network': network, 'pretrain_network': path}).trainable_state_dict()
    assert all(torch.equal(loaded[name], trained[name]) for name in trained)

    first = sorted(trained)[0]
    torch.save({'params': {f'renamed.{first}': trained[first]}}, path)
    with pytest.raises(KeyError, match='net_g_10.pth'):
        build_framework({'network': network, 'pretrain_network': path})


def test_strict_load_assigns_into_a_meta_model_and_names_leftovers():
    from torch import nn

    from dspo_basicsr.utils.checkpoint import load_state_dict_strictly
    with torch.device('meta'):
        net = nn.Linear(2, 3)
    state = {'weight': torch.ones(3, 2), 'bias': torch.zeros(3)}
    assert load_state_dict_strictly(net, state, 'net.pth') is net
    assert not net.weight.is_meta and torch.equal(net.weight, state['weight'])
    with torch.device('meta'):
        net = nn.Linear(2, 3)
    with pytest.raises(KeyError, match="net.pth does not match the head: missing keys \\['bias'\\].*Check it"):
        load_state_dict_strictly(net, {'weight': torch.ones(3, 2)}, 'net.pth', 'the head', hint='Check it.')
    with torch.device('meta'):
        net = nn.BatchNorm1d(3)
    net.register_buffer('not_saved', torch.empty(1, device='meta'), persistent=False)
    state = {name: torch.zeros(t.shape, dtype=t.dtype) for name, t in net.state_dict().items()}
    with pytest.raises(RuntimeError, match="net.pth: \\['not_saved'\\] were not loaded"):
        load_state_dict_strictly(net, state, 'net.pth')
