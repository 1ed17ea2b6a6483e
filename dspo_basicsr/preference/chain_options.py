"""The chain's option file and what its sections build: the framework, sampling settings, scorer, feedback."""
import copy

__all__ = ['load_chain_options', 'build_framework', 'sampling_settings', 'scorer_from_options',
           'feedback_from_options']


def load_chain_options(path):
    """Read the chain's YAML option file with the one safe option reader (no Python tags, UTF-8 text).

    Raises:
        ValueError: The file uses a renamed key (one line naming the new ones).
    """
    from dspo_basicsr.utils.option_schema import renamed_option_findings
    from dspo_basicsr.utils.options import plain_options, read_option_file
    opt = plain_options(read_option_file(path, require=()))  # the reader refuses anything but a mapping
    framework = opt.get('framework') if isinstance(opt.get('framework'), dict) else {}
    renamed = renamed_option_findings(opt, networks={'framework.network': framework.get('network')})
    sampling = opt.get('sampling') if isinstance(opt.get('sampling'), dict) else {}
    renamed += [f'sampling.{part}.cfg was renamed to sampling.{part}.guidance_scale' for part in ('default', 'grid')
                if isinstance(sampling.get(part), dict) and 'cfg' in sampling[part]]
    if renamed:
        raise ValueError(f"{path}: {'; '.join(renamed)}")
    return opt


def build_framework(opt, device='cpu'):
    """Build a diffusion SR framework from ``{network: <network_g-style dict>, pretrain_network?, param_key?}``.

    ``network`` goes through BasicSR's ``build_network`` (so any registered arch works); the optional
    ``pretrain_network`` is a BasicSR checkpoint (``{param_key: state_dict}``, read weights-only) loaded on top
    with every key checked: a fine-tuned ``net_g_*.pth`` holds exactly the trained parameters of the framework
    (``load_trainable_state_dict``), any other network's file its whole state dict.
    """
    from dspo_basicsr.utils.checkpoint import check_state_dict_matches, read_checkpoint

    from basicsr.archs import build_network

    if 'network' not in opt:
        raise KeyError("The framework section needs 'network': a network_g-style dict (type: ControlSD2Arch, ...).")
    net = build_network(copy.deepcopy(dict(opt['network'])))
    path = opt.get('pretrain_network')
    if path:
        state = read_checkpoint(path, what='framework.pretrain_network', unwrap=(opt.get('param_key', 'params'),))
        source = f"framework.pretrain_network '{path}'"
        if hasattr(net, 'load_trainable_state_dict'):
            net.load_trainable_state_dict(state, source=source)
        else:
            check_state_dict_matches(net.state_dict(), state, source, type(net).__name__)
            net.load_state_dict(state)
    return net.to(device).eval()


def sampling_settings(framework, sampling_opt):
    """The candidate settings of the ``sampling`` section: ``default`` first, then the ``grid``.

    ``default`` falls back to the framework's own (``default_steps``, ``default_guidance_scale``, seed 0). The section's
    ``prompt_source`` (``tags``: RAM / DAPE tags at sampling time), ``color_fix``, ``process_size``,
    ``tile_size``, ``tile_overlap`` and ``vae_tile`` are added to every setting.
    """
    from dspo_basicsr.preference.candidates import expand_settings_grid

    sampling_opt = dict(sampling_opt or {})
    default = sampling_opt.get('default')
    if default is None:
        default = {'steps': getattr(framework, 'default_steps', 50),
                   'guidance_scale': getattr(framework, 'default_guidance_scale', 5.5), 'seed': 0}
    settings = expand_settings_grid(sampling_opt.get('grid'), default)
    # prompt_source / color_fix / tiling of the section apply to every candidate (framework.sample keywords).
    from dspo_basicsr.archs.diffusion_sr_base import sample_protocol
    protocol = sample_protocol(sampling_opt)
    return [dict(protocol, **setting) for setting in settings]


def scorer_from_options(opt, scorer_type=None, annotations=None):
    """The instance scorer of the ``scorer`` section (``type`` metric | biqa | vlm | human)."""
    from dspo_basicsr.preference.instance_scoring import build_instance_scorer

    scorer_opt = dict(opt.get('scorer') or {'type': 'metric'})
    if scorer_type:
        if scorer_type != scorer_opt.get('type'):
            scorer_opt = dict(opt.get(f'scorer_{scorer_type}') or {})
        scorer_opt['type'] = scorer_type
    if annotations:
        scorer_opt['annotations'] = annotations
    if scorer_opt.get('type') == 'metric' and 'metrics' not in scorer_opt and opt.get('instance_metrics'):
        scorer_opt['metrics'] = opt['instance_metrics']
    return build_instance_scorer(scorer_opt)


def feedback_from_options(opt):
    """The description-feedback settings of the ``feedback`` section, or None when it is absent.

    Section keys: ``vlm`` (options of :class:`.vlm_client.VLMClient`), ``embedder`` (``minilm`` |
    ``hashing``), ``threshold`` (0.1), ``min_crop`` (64).
    """
    section = opt.get('feedback')
    if not section:
        return None
    from dspo_basicsr.preference.feedback import build_embedder
    from dspo_basicsr.preference.vlm_client import VLMClient

    if 'vlm' not in section:
        raise KeyError("The feedback section needs 'vlm': the options of the VLM that describes the crops.")
    client = VLMClient(**section['vlm'])
    return {'describe': client.describe, 'embed': build_embedder(section.get('embedder', 'minilm')),
            'threshold': float(section.get('threshold', 0.1)), 'min_crop': int(section.get('min_crop', 64))}
