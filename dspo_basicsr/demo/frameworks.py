"""The SeeSR, AddSR and OSEDiff demos: a tiny base of each framework pretrained on the demo crops, and a
preference set whose candidates that same framework sampled.

Each framework follows the SD2 demo (:func:`dspo_basicsr.demo.dspo.build_demo_data`): the same HQ crops and
degradations, a tiny VAE pretrained as an autoencoder (:func:`~dspo_basicsr.demo.dspo.pretrain_tiny_vae`,
nearly deterministic posterior), the framework's denoising networks pretrained on its own training path
(:func:`~dspo_basicsr.demo.dspo.pretrain_tiny_denoiser`), the model saved in the framework's released layout
and loaded back through its real loading code, N candidates per LQ sampled by it under
:data:`~dspo_basicsr.demo.dspo.DEMO_CANDIDATE_SETTINGS`, and the preferred / dispreferred candidate of each
SLIC instance by PSNR against the HQ crop inside it.

Where sampling starts is the demo's, not the released models' (a tiny model denoises badly from t = 999):
SeeSR from the LQ latent noised to ``start_timestep`` 250 (the last 3 of 8 DDIM steps, as the SD2 demo),
AddSR's x0-predicting sampler on the timesteps (250, 125), OSEDiff at its own one-step
operating point (t = 999 on the LQ latent, as released). The tiny OSEDiff's schedule predicts v (as SD2.1-768's
does; SD2.1-base, OSEDiff's base, predicts the noise): at t = 999 v is about -x0, so the tiny UNet learns the SR
latent itself, where a noise prediction would have to return its input to 1/15 of its spread (x0 =
(z_L - sqrt(1 - a) eps) / sqrt(a), sqrt(a) = 0.068).
"""
import copy
import os

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dspo_basicsr.demo.dspo import (
    DEMO_BASE,
    DEMO_CANDIDATE_SETTINGS,
    degrade,
    demo_tiny_components,
    denoiser_options,
    hq_crops,
    instance_pairs_by_psnr,
    pretrain_tiny_denoiser,
    pretrain_tiny_vae,
    vae_options,
)
from dspo_basicsr.utils.image_io import to_uint8_rgb

__all__ = ['FRAMEWORK_DEMOS', 'build_framework_demo', 'framework_network_options']

#: Per framework: its arch, the demo's ``network_g`` options beyond the folders (trained part, where sampling
#: starts), the modules pretrained as a denoiser and, where it is not the noise, the schedule's prediction type.
FRAMEWORK_DEMOS = {
    'seesr': dict(type='TinySeeSRArch', network=dict(
        trainable='controlnet', sampler='ddim', start_timestep=250, added_prompt='', default_negative_prompt=''),
        modules=('unet', 'controlnet')),
    'addsr': dict(type='TinyAddSRArch', network=dict(
        trainable='controlnet', timesteps=[250, 125], added_prompt='', default_negative_prompt=''),
        modules=('unet', 'controlnet')),
    'osediff': dict(type='TinyOSEDiffArch', network=dict(trainable='unet_lora', lora_rank=4), modules=('unet',),
                    prediction_type='v_prediction'),
}


def framework_network_options(framework, root='datasets/demo', scale=4):
    """The ``network_g`` option of a framework demo built under ``root`` (what its option file says)."""
    spec = FRAMEWORK_DEMOS[framework]
    folder = os.path.join(root, framework)
    net = dict(type=spec['type'], pretrained_model_path=os.path.join(folder, 'sd2'), scale=scale,
               ram_path=os.path.join(folder, 'ram', 'ram_tiny.pth'))
    if framework == 'osediff':
        net['osediff_path'] = os.path.join(folder, 'osediff.pkl')
    else:
        net['seesr_model_path' if framework == 'seesr' else 'addsr_model_path'] = os.path.join(folder, framework)
    net.update(spec['network'])
    return net


def _random_released_model(framework, folder, settings, seed):
    """Save a tiny random framework in its released layout under ``folder`` (weights replaced after pretraining)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from dspo_basicsr.archs.control_sd2_arch import controlnet_embedding_channels, save_sd_components
    from dspo_basicsr.archs.ram_arch import save_ram_checkpoint
    from dspo_basicsr.archs.seesr_arch import add_image_cross_attention, save_seesr_networks
    from dspo_basicsr.demo.tiny_components import (
        TINY_IMAGE_DIM,
        tiny_noise_scheduler,
        tiny_ram_embedder,
        tiny_sd_components,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tiny = demo_tiny_components(settings, seed)
        components = tiny_sd_components(unet=tiny['unet_config'], vae=tiny['vae_config'])
        prediction_type = FRAMEWORK_DEMOS[framework].get('prediction_type')
        if prediction_type:
            components['noise_scheduler'] = tiny_noise_scheduler(prediction_type)
        if framework == 'osediff':
            tagger = tiny_ram_embedder(tagging=True)  # OSEDiff's test prompts are DAPE tags
        else:
            unet = components.pop('unet')
            factor = 2**(len(settings['vae_widths']) - 1)
            controlnet = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=controlnet_embedding_channels(factor))
            tagger = tiny_ram_embedder(embed_dim=TINY_IMAGE_DIM, tagging=True)
    sd_folder = os.path.join(folder, 'sd2')
    if framework == 'osediff':
        save_sd_components(sd_folder, components)
    else:
        save_sd_components(sd_folder, dict(components, unet=UNet2DConditionModel.from_config(unet.config)))
        save_seesr_networks(os.path.join(folder, framework), add_image_cross_attention(unet, TINY_IMAGE_DIM),
                            add_image_cross_attention(controlnet, TINY_IMAGE_DIM))
    save_ram_checkpoint(tagger, os.path.join(folder, 'ram', 'ram_tiny.pth'))


def save_identity_osediff_lora(unet, vae, path, rank=4):
    """OSEDiff's released LoRA file for a UNet that already is the one-step model: every LoRA B is zero.

    The tiny one-step UNet is pretrained in full (a random tiny SD has no base worth adapting), so its weights
    go to the SD folder and ``osediff.pkl`` holds OSEDiff's adapters (same modules, ranks and ``conv_in``) as
    identity maps; :func:`~dspo_basicsr.archs.osediff_arch.load_osediff_lora` merges them back to that UNet.
    """
    from dspo_basicsr.archs.osediff_arch import read_osediff_lora, save_osediff_lora
    save_osediff_lora(unet, vae, path, rank_unet=rank, rank_vae=rank)
    lora = read_osediff_lora(path)
    for key in ('state_dict_unet', 'state_dict_vae'):
        lora[key] = {k: torch.zeros_like(v) if 'lora_B' in k else v for k, v in lora[key].items()}
    torch.save(lora, path)
    return path


def _save_pretrained(framework, model, folder):
    """Write the pretrained tiny framework over the random one, in the same released layout."""
    from dspo_basicsr.archs.control_sd2_arch import save_sd_components
    from dspo_basicsr.archs.seesr_arch import save_seesr_networks

    sd_folder = os.path.join(folder, 'sd2')
    if framework == 'osediff':
        save_sd_components(sd_folder, dict(unet=model.unet, vae=model.vae))
        save_identity_osediff_lora(model.unet, model.vae, os.path.join(folder, 'osediff.pkl'))
    else:
        save_sd_components(sd_folder, dict(vae=model.vae))
        save_seesr_networks(os.path.join(folder, framework), model.unet, model.controlnet)


def _as_tensor(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)


def build_framework_demo(framework, root='datasets/demo', scale=4, size=64, crops_per_photo=2, n_segments=8, seed=0,
                         overwrite=False, base=None):
    """Build ``root/<framework>/``: the tiny pretrained framework, its own preference set, validation folders.

    Layout (``F`` = ``root/<framework>``)::

        F/sd2/                    SD2-base folder (diffusers layout; SeeSR / AddSR use its VAE, text encoder,
                                  tokenizer and scheduler; OSEDiff also its UNet)
        F/seesr/ or F/addsr/      SeeSR's released unet/ and controlnet/ (image cross-attention)
        F/osediff.pkl             OSEDiff's LoRA file (OSEDiff only)
        F/ram/ram_tiny.pth        a tiny random RAM (image embeddings for SeeSR / AddSR, tags for prompt_source)
        F/pref.lmdb               candidates sampled by this framework, labelled by instance PSNR
        F/val/gt, F/val/lq        the held-out crops (the same as the SD2 demo's)

    Args:
        framework (str): ``seesr``, ``addsr`` or ``osediff``.
        base (dict | None): Overrides of :data:`~dspo_basicsr.demo.dspo.DEMO_BASE` (e.g. fewer steps in tests).

    Returns:
        dict: paths of the parts, the ``network_g`` option and the number of training samples.
    """
    from dspo_basicsr.preference import PreferenceSample, write_preference_lmdb
    from dspo_basicsr.preference.segmentation import SLICSegmenter, segment_instances

    from basicsr.archs import build_network

    if framework not in FRAMEWORK_DEMOS:
        raise ValueError(f"unknown framework demo '{framework}': choose one of {sorted(FRAMEWORK_DEMOS)}.")
    settings = dict(DEMO_BASE, **(base or {}))
    folder = os.path.join(root, framework)
    lmdb_path = os.path.join(folder, 'pref.lmdb')
    if os.path.exists(lmdb_path) and not overwrite:
        raise FileExistsError(f"'{lmdb_path}' exists; pass --overwrite (overwrite=True) to rebuild the "
                              f'{framework} demo.')
    os.makedirs(folder, exist_ok=True)
    # The SD2 demo's crops, split and degradations (build_demo_data), so the held-out figures compare.
    crops = hq_crops(size, crops_per_photo + 1, seed)
    train = [c for i, c in enumerate(crops) if i % (crops_per_photo + 1) != crops_per_photo]
    val = [c for i, c in enumerate(crops) if i % (crops_per_photo + 1) == crops_per_photo]
    train_lq = [degrade(hq, scale, seed=seed * 1000 + index) for index, (_, hq, _) in enumerate(train)]
    hq, lq = _as_tensor([c[1] for c in train]), _as_tensor(train_lq)
    prompts = [prompt for _, _, prompt in train]

    spec = FRAMEWORK_DEMOS[framework]
    net_opt = framework_network_options(framework, root, scale)
    _random_released_model(framework, folder, settings, seed)
    # Pretraining trains whole networks, so the model is loaded without the DSPO LoRA adapters.
    random_opt = {k: v for k, v in net_opt.items() if k != 'osediff_path'}  # not written yet
    model = build_network(dict(random_opt, trainable=list(spec['modules'])))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pretrain_tiny_vae(model.vae, hq, model.upsample_lq(lq), generator=generator, **vae_options(settings))
        if getattr(model, 'lq_vae', None) is not None:  # OSEDiff encodes the LQ with its own copy of the VAE
            model.lq_vae = copy.deepcopy(model.vae)
        pretrain_tiny_denoiser(model, hq, lq, prompts, generator=generator, **denoiser_options(settings),
                               max_timestep=None if framework == 'osediff' else settings['max_timestep'],
                               modules=spec['modules'])
    _save_pretrained(framework, model, folder)
    del model

    framework_model = build_network(dict(net_opt)).eval()  # loaded back as a user's model would be
    segmenter = SLICSegmenter(n_segments=n_segments, compactness=10.0)

    def samples():
        for index, (sid, hq_crop, prompt) in enumerate(train):
            candidates = []
            for setting in DEMO_CANDIDATE_SETTINGS:
                generator = torch.Generator().manual_seed(setting['seed'])
                sr = framework_model.sample(_as_tensor([train_lq[index]]), prompt, steps=setting['steps'],
                                            guidance_scale=setting['guidance_scale'], generator=generator)
                candidates.append(to_uint8_rgb(sr[0]))
            seg = segment_instances(segmenter, hq_crop, min_area=16)
            yield PreferenceSample(
                sid=sid, lq=train_lq[index], candidates=candidates, seg=seg,
                instances=instance_pairs_by_psnr(candidates, hq_crop, seg), prompt=prompt, negative_prompt='',
                gt=hq_crop, meta={'candidates': list(DEMO_CANDIDATE_SETTINGS), 'default_candidate': 0,
                                  'source': 'skimage.data', 'framework': framework})

    with torch.no_grad():
        write_preference_lmdb(lmdb_path, tqdm(samples(), total=len(train), desc=f'{framework} demo preference set'),
                              scale=scale, overwrite=overwrite, progress=False)
    for sub in ('gt', 'lq'):
        os.makedirs(os.path.join(folder, 'val', sub), exist_ok=True)
    for index, (sid, hq_crop, _) in enumerate(val):
        lq_crop = degrade(hq_crop, scale, seed=seed * 1000 + 500 + index)
        cv2.imwrite(os.path.join(folder, 'val', 'gt', f'{sid}.png'), cv2.cvtColor(hq_crop, cv2.COLOR_RGB2BGR))
        cv2.imwrite(os.path.join(folder, 'val', 'lq', f'{sid}.png'), cv2.cvtColor(lq_crop, cv2.COLOR_RGB2BGR))
    return dict(folder=folder, preference_set=lmdb_path, val=os.path.join(folder, 'val'), network_g=net_opt,
                num_samples=len(train))
