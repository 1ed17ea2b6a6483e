"""The GPU planner (dspo_basicsr.bench.gpu_plan) on tiny frameworks: a real DSPOModel step on meta tensors."""
import pytest
import torch

from dspo_basicsr.bench.gpu_plan import (
    GPU_PEAK_BF16_TFLOPS,
    apply_overrides,
    format_plan,
    matrix_markdown,
    plan_step,
)
from dspo_basicsr.losses.preference_loss import DEFAULT_BETA


def tiny_options(arch='ControlSD2Arch', **network):
    return {
        'name': 'plan', 'model_type': 'DSPOModel', 'scale': 4,
        'network_g': dict({'type': 'Tiny' + arch, 'scale': 4}, **network),
        'train': {'optim_g': {'type': 'AdamW', 'lr': 1e-5},
                  'preference_opt': {'type': 'DSPOLoss', 'beta': DEFAULT_BETA}},
        'val': {'sample': {'steps': 2, 'guidance_scale': 2.0, 'seed': 0}},
    }


@pytest.fixture(scope='module')
def control_plan():
    return plan_step(tiny_options(), size=64, candidates=2, real_size=False, validation=False)


def build_tiny(opt):
    """The same tiny framework the planner builds, on the CPU, to count its tensors by hand."""
    import dspo_basicsr  # noqa: F401

    from basicsr.archs import build_network
    return build_network(dict(opt['network_g']))


@pytest.mark.slow
def test_state_bytes_equal_a_count_by_hand_from_numel(control_plan):
    net = build_tiny(tiny_options())
    trainable = [p for p in net.parameters() if p.requires_grad]
    reference = [p for name in net.full_trainable_modules for p in getattr(net, name).parameters()]
    param_bytes = 4 * (sum(p.numel() for p in net.parameters()) + sum(p.numel() for p in reference))
    grad_bytes = 4 * sum(p.numel() for p in trainable)
    adam_bytes = 2 * grad_bytes + 4 * len(trainable)  # exp_avg, exp_avg_sq, and a float32 step per tensor
    after = control_plan['memory_after_step']
    assert after['parameters'] == param_bytes == control_plan['expected']['parameters']
    assert after['gradients'] == grad_bytes
    assert after['optimizer_state'] == adam_bytes
    peak = control_plan['memory']
    assert peak['parameters'] == param_bytes and peak['optimizer_state'] == adam_bytes
    assert peak['activations'] > 0 and peak['total'] > after['total']


@pytest.mark.slow
def test_flops_are_split_consistently(control_plan):
    flops = control_plan['flops']
    phases = [k for k in flops if k != 'total']
    assert sum(flops[k] for k in phases) == flops['total'] > 0
    for phase in ('policy forward', 'reference forward', 'backward', 'vae', 'condition'):
        assert flops[phase] > 0, phase
    # policy and reference are the same networks at initialisation: the same forward cost
    assert flops['reference forward'] == pytest.approx(flops['policy forward'], rel=0.01)
    floors = control_plan['step_time_floor_s']
    assert list(floors) == list(GPU_PEAK_BF16_TFLOPS)
    assert floors['RTX 4090'] > floors['A100 SXM'] > floors['H100 SXM'] > 0


@pytest.mark.slow
def test_more_candidates_cost_more_activations_and_flops(control_plan):
    four = plan_step(tiny_options(), size=64, candidates=4, real_size=False, validation=False)
    assert four['flops']['total'] > control_plan['flops']['total']
    assert four['memory']['activations'] > control_plan['memory']['activations']
    assert four['memory_after_step']['optimizer_state'] == control_plan['memory_after_step']['optimizer_state']


@pytest.mark.slow
def test_cached_latents_remove_the_candidates_vae_encoding(control_plan):
    cached = plan_step(tiny_options(), size=64, candidates=2, real_size=False, validation=False, cached_latents=True)
    assert cached['settings']['cached_latents'] and not control_plan['settings']['cached_latents']
    assert cached['flops']['vae'] < control_plan['flops']['vae']
    assert cached['flops']['policy forward'] == control_plan['flops']['policy forward']


@pytest.mark.slow
def test_eight_bit_adamw_state_is_bitsandbytes_layout(control_plan):
    from dspo_basicsr.bench.gpu_plan import eight_bit_state_bytes
    opt = tiny_options()
    opt['train']['optim_g']['type'] = 'AdamW8bit'
    plan = plan_step(opt, size=64, candidates=2, real_size=False, validation=False)
    trainable = [p for p in build_tiny(tiny_options()).parameters() if p.requires_grad]
    assert plan['settings']['optimizer'] == 'AdamW8bit'
    assert plan['memory_after_step']['optimizer_state'] == eight_bit_state_bytes(trainable)
    assert plan['memory_after_step']['optimizer_state'] < control_plan['memory_after_step']['optimizer_state']
    assert eight_bit_state_bytes([torch.empty(256 * 64)]) == 2 * 256 * 64 + 2 * 4 * 64 + 4  # uint8 moments + absmax
    assert eight_bit_state_bytes([torch.empty(100)]) == 8 * 100 + 4  # small tensors keep float32 moments


@pytest.mark.slow
@pytest.mark.parametrize('arch, network, feedback', [
    ('ControlSD2Arch', {}, 5.5),
    ('SeeSRArch', {'mixed_precision': 'bf16', 'random_ram': False}, None),
    pytest.param('AddSRArch', {}, None, marks=pytest.mark.slow),  # ~25 s: four sampling steps with a tiny RAM
    ('OSEDiffArch', {'trainable': 'unet_lora'}, None),
])
def test_planner_runs_each_tiny_framework_with_a_validation_sample(arch, network, feedback):
    opt = tiny_options(arch, **network)
    if feedback:
        opt['train']['feedback_guidance_scale'] = feedback
    plan = plan_step(opt, size=64, candidates=2, real_size=False)
    assert plan['settings']['framework'] == 'Tiny' + arch  # the demo's tiny type of the framework
    assert plan['flops']['total'] > 0 and plan['memory']['total'] > 0
    if network.get('random_ram') is False:  # no RAM: SeeSR cannot sample, the plan says so
        assert 'RAM' in plan['validation']['skipped']
    else:
        assert plan['validation']['flops_total'] > 0 and plan['validation']['peak_bytes'] > 0
    assert arch in format_plan(plan)


@pytest.mark.slow
def test_meta_autocast_keeps_bf16_activations_and_frozen_weights():
    full = plan_step(tiny_options('SeeSRArch'), size=64, candidates=2, real_size=False, validation=False)
    mixed = plan_step(tiny_options('SeeSRArch', mixed_precision='bf16'), size=64, candidates=2, real_size=False,
                      validation=False)
    assert mixed['memory']['parameters'] < full['memory']['parameters']
    assert mixed['memory']['activations'] < full['memory']['activations']
    assert mixed['memory_after_step']['optimizer_state'] == full['memory_after_step']['optimizer_state']


@pytest.mark.slow
def test_gradient_checkpointing_lowers_the_activation_peak():
    plain = plan_step(tiny_options('SeeSRArch'), size=64, candidates=2, real_size=False, validation=False)
    ckpt = plan_step(tiny_options('SeeSRArch', gradient_checkpointing=True), size=64, candidates=2,
                     real_size=False, validation=False)
    assert ckpt['memory']['activations'] < plain['memory']['activations']
    assert ckpt['flops']['backward'] > plain['flops']['backward']  # recomputation


def test_overrides_set_dotted_keys_as_yaml_values():
    opt = apply_overrides(tiny_options(), ['network_g.trainable=unet_lora', 'train.optim_g.lr=1e-4',
                                           'train.feedback_guidance_scale=null', 'val.sample.new=[1, 2]'])
    assert opt['network_g']['trainable'] == 'unet_lora'
    assert opt['train']['optim_g']['lr'] == pytest.approx(1e-4)
    assert opt['train']['feedback_guidance_scale'] is None
    assert opt['val']['sample']['new'] == [1, 2]
    with pytest.raises(ValueError, match='dotted.key=value'):
        apply_overrides({}, ['network_g.trainable'])


@pytest.mark.slow
def test_matrix_markdown_row_says_what_fits(control_plan):
    table = matrix_markdown([('tiny', dict(trainable='controlnet', candidates=2, feedback=0, checkpointing=False),
                              control_plan)])
    assert table.count('\n') == 2 and '| tiny | controlnet | 2 | off | off |' in table and '24 GB' in table


def test_the_training_step_still_runs_on_the_cpu_after_the_meta_paths():
    """The meta paths of DSPOModel leave the real step unchanged: finite loss and an update on the CPU."""
    from dspo_basicsr.bench.dspo_step import bench_dspo_opt, synthetic_preference_batch

    from basicsr.models import build_model
    opt = bench_dspo_opt(torch.device('cpu'))
    opt['network_g'].pop('unet_config')  # the default tiny UNet, not the benchmark's wider one
    model = build_model(opt)
    before = [p.detach().clone() for p in model.trainable_params]
    model.feed_data(synthetic_preference_batch(1, 2, 4, 64, 'cpu'))
    model.optimize_parameters(1)
    assert model.log_dict['l_dspo'] == pytest.approx(model.log_dict['l_dspo'])  # a float, not NaN
    assert any(not torch.equal(a, p) for a, p in zip(before, model.trainable_params))


@pytest.mark.slow
def test_a_bf16_reference_saves_two_bytes_per_reference_weight(control_plan):
    opt = tiny_options()
    opt['train']['reference_dtype'] = 'bfloat16'
    plan = plan_step(opt, size=64, candidates=2, real_size=False, validation=False)
    reference_elements = control_plan['memory_after_step']['gradients'] // 4  # the reference copies the trained part
    saved = control_plan['memory_after_step']['parameters'] - plan['memory_after_step']['parameters']
    assert saved == 2 * reference_elements
    assert plan['flops']['reference forward'] > 0
