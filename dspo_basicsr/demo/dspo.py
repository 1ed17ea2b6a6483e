"""The embedded tiny default: a preference set built from scikit-image's bundled photos.

Everything is made locally, with no download: HQ crops of ``skimage.data`` photos, LQ images from
BasicSR's degradation functions, a tiny ControlSD2 model briefly pretrained on those crops (VAE as an
autoencoder, then UNet + ControlNet as an LQ-conditioned denoiser) and saved in the released diffusers
layout, N candidates sampled from it under different sampling settings after loading it back as a user's
model would be, a SLIC label map per image, and the preferred / dispreferred candidate of each instance by
PSNR against the HQ crop inside that instance.
"""
import inspect
import math
import os
import shutil

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dspo_basicsr.utils.image_io import to_uint8_rgb

from basicsr.data.degradations import add_gaussian_noise, add_jpg_compression, bivariate_Gaussian

#: (skimage.data function, prompt) of the photos the demo uses; all ship inside scikit-image.
DEMO_PHOTOS = (
    ('astronaut', 'a photo of an astronaut'), ('chelsea', 'a photo of a cat'), ('coffee', 'a cup of coffee'),
    ('rocket', 'a rocket on a launch pad'), ('immunohistochemistry', 'stained tissue under a microscope'),
    ('hubble_deep_field', 'galaxies'),
)

#: Sampling settings of the demo candidates; the first is the framework's default.
DEMO_CANDIDATE_SETTINGS = (
    dict(steps=8, guidance_scale=3.0, seed=0), dict(steps=4, guidance_scale=1.0, seed=1),
    dict(steps=8, guidance_scale=5.5, seed=2), dict(steps=4, guidance_scale=3.0, seed=3),
)


def hq_crops(size=64, crops_per_photo=2, seed=0):
    """Random ``size`` x ``size`` RGB crops of the bundled photos, resized so a crop holds a scene part.

    Returns:
        list[tuple[str, np.ndarray, str]]: (sample id, uint8 RGB crop, prompt).
    """
    import skimage.data
    rng = np.random.default_rng(seed)
    crops = []
    for name, prompt in DEMO_PHOTOS:
        photo = getattr(skimage.data, name)()
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        photo = photo[..., :3]
        short = min(photo.shape[:2])
        factor = 2.5 * size / short
        photo = cv2.resize(photo, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        h, w = photo.shape[:2]
        for i in range(crops_per_photo):
            top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
            crops.append((f'{name}_{i}', np.ascontiguousarray(photo[top:top + size, left:left + size]), prompt))
    return crops


def degrade(hq, scale=4, seed=0):
    """Blur (anisotropic Gaussian), x``scale`` bicubic downsampling, Gaussian noise and JPEG.

    Args:
        hq (np.ndarray): (H, W, 3) uint8 RGB.

    Returns:
        np.ndarray: (H/scale, W/scale, 3) uint8 RGB.
    """
    rng = np.random.default_rng(seed)
    kernel = bivariate_Gaussian(21, rng.uniform(0.6, 2.0), rng.uniform(0.6, 2.0), rng.uniform(-np.pi, np.pi))
    img = cv2.filter2D(hq.astype(np.float32) / 255.0, -1, kernel)
    h, w = hq.shape[:2]
    img = cv2.resize(img, (w // scale, h // scale), interpolation=cv2.INTER_CUBIC)
    # BasicSR draws the noise from numpy's global generator: seed it here (and restore it) so a rebuild is identical
    global_state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        img = add_gaussian_noise(np.clip(img, 0, 1), sigma=rng.uniform(1, 8), clip=True, rounds=False)
    finally:
        np.random.set_state(global_state)
    img = add_jpg_compression(img, quality=int(rng.uniform(50, 95)))
    return (np.clip(img, 0, 1) * 255.0).round().astype(np.uint8)


def instance_pairs_by_psnr(candidates, gt, seg):
    """Preferred / dispreferred candidate of each instance: highest and lowest PSNR inside it.

    Args:
        candidates (list[np.ndarray]): N (H, W, 3) uint8 images.
        gt (np.ndarray): (H, W, 3) uint8 ground truth.
        seg (np.ndarray): (H, W) label map with ids 0..M-1.

    Returns:
        list[dict]: ``{id, win, lose, scores, candidate_scores?}`` per instance (PSNR of each candidate, dB).
    """
    diff = (np.stack(candidates).astype(np.float64) - gt.astype(np.float64)[None])**2  # (N, H, W, 3)
    instances = []
    for m in range(int(seg.max()) + 1):
        mask = seg == m
        mse = diff[:, mask].mean(axis=(1, 2))
        psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
        win, lose = int(np.argmax(psnr)), int(np.argmin(psnr))
        if win == lose:
            win = lose = -1
        row = {'id': m, 'win': win, 'lose': lose, 'scores': {'psnr': [round(float(p), 4) for p in psnr]}}
        if win >= 0:
            row['candidate_scores'] = row['scores']['psnr']  # what DSPOLoss pairs: top_bottom ranks
        instances.append(row)
    return instances


def instance_win_rate(current, reference, gts, segs):
    """Instance-level win rate of ``current`` over ``reference`` by the rule that labels the demo set.

    An instance is won when the current image's PSNR against the GT inside it is higher than the
    reference's (:func:`instance_pairs_by_psnr`'s rule), lost when lower, tied when equal.

    Args:
        current, reference, gts (list[np.ndarray]): (H, W, 3) uint8 images, one per crop.
        segs (list[np.ndarray]): (H, W) label maps with ids 0..M-1.

    Returns:
        dict: ``wins``, ``losses``, ``ties`` and ``win_rate`` = (wins + ties / 2) / instances.
    """
    wins = losses = ties = 0
    for cur, ref, gt, seg in zip(current, reference, gts, segs):
        for instance in instance_pairs_by_psnr([cur, ref], gt, seg):
            psnr_current, psnr_reference = instance['scores']['psnr']
            wins += psnr_current > psnr_reference
            losses += psnr_current < psnr_reference
            ties += psnr_current == psnr_reference
    total = wins + losses + ties
    return dict(wins=wins, losses=losses, ties=ties, win_rate=(wins + ties / 2) / total if total else float('nan'))


def _augmented_batch(images, batch, generator, patch_size=None):
    """Random flips / 90-degree rotations of ``batch`` images drawn from (N, 3, H, W) ``images``, optionally
    cut to random ``patch_size`` x ``patch_size`` patches (one position per drawn image)."""
    index = torch.randint(0, images.shape[0], (batch,), generator=generator)
    out = images[index]
    if patch_size and patch_size < min(images.shape[2:]):
        h, w = images.shape[2:]
        tops = torch.randint(0, h - patch_size + 1, (batch,), generator=generator)
        lefts = torch.randint(0, w - patch_size + 1, (batch,), generator=generator)
        rows = (tops[:, None] + torch.arange(patch_size))[:, None, :, None]  # (B, 1, P, 1)
        cols = (lefts[:, None] + torch.arange(patch_size))[:, None, None, :]  # (B, 1, 1, P)
        out = out[torch.arange(batch)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    if torch.rand((), generator=generator) < 0.5:
        out = out.flip(-1)
    return out.rot90(int(torch.randint(0, 4, (), generator=generator)), dims=(-2, -1))


def set_posterior_std(vae, std):
    """Make a VAE's posterior std the constant ``std`` (unscaled latent units): nearly deterministic, as SD's.

    The tiny VAE learns by decoding the posterior mode, so its log-variance keeps its random initial value
    (std about 1, as large as the latents themselves). Training samples the posterior (``encode_images`` with
    ``sample_posterior``, as the Diffusion-DPO code does with SD's VAE), and that noise would then swamp both the
    denoiser, which learnt on the mode, and the candidates' differences. The log-variance is the second half of
    ``quant_conv``'s output channels (diffusers' ``DiagonalGaussianDistribution``).
    """
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:].zero_()
        vae.quant_conv.bias[channels:].fill_(2 * math.log(std))


def pretrain_tiny_vae(vae, hq, bicubic, steps=200, batch=8, generator=None, lr=2e-3, patch_size=None):
    """Train a tiny random VAE as an autoencoder of HQ crops and bicubic-upsampled LQ images, in place.

    Half of each batch is bicubic LQ, because sampling starts from the latent of that image. Afterwards the
    latent scaling factor is 1 / std of the HQ latents, as Stable Diffusion's was, and the posterior is made
    nearly deterministic (:func:`set_posterior_std`).

    Args:
        vae (AutoencoderKL): Tiny diffusers VAE.
        hq (Tensor): (N, 3, H, W) HQ crops in [0, 1].
        bicubic (Tensor): (N, 3, H, W) their bicubic-upsampled LQ images in [0, 1].
        patch_size (int | None): Train on random patches of this size; None: whole crops. A patch of half the
            crop costs a quarter, so more steps fit the same time: with latent factor 2, 400 steps of 16 patches of
            32 px (lr 3e-3) reconstruct held-out crops at 23.8 dB, 200 steps of 8 whole crops (as many pixels)
            at 20.3 dB (:data:`DEMO_BASE` uses patches).
    """
    generator = generator or torch.Generator().manual_seed(0)
    vae.requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc='pretrain tiny VAE', leave=False):
        x = torch.cat([_augmented_batch(hq, batch - batch // 2, generator, patch_size),
                       _augmented_batch(bicubic, batch // 2, generator, patch_size)]) * 2 - 1
        posterior = vae.encode(x).latent_dist
        # Decoding the posterior mode (not a sample) converges in far fewer steps; the latents
        # the framework uses are the mode too (encode_images).
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.mode()).sample, x)
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.requires_grad_(False)
    if steps:
        with torch.no_grad():
            std = vae.encode(hq * 2 - 1).latent_dist.mode().std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        set_posterior_std(vae, 1e-3 * std)
    return vae


def pretrain_tiny_denoiser(framework, hq, lq, prompts, steps=300, batch=8, generator=None, lr=1e-3,
                           max_timestep=None, modules=('unet', 'controlnet'), patch_size=None):
    """Train a framework's denoising networks on the plain diffusion loss of its own training path, in place.

    Each step takes the framework's condition of the LQ images (:meth:`condition`), its timesteps
    (:meth:`training_timesteps`) and its noisy input and regression target (:meth:`diffusion_inputs`), so
    every framework (multi-step or one-step) learns what its sampler asks of it. An empty prompt 20 % of the
    time (as SD was trained) makes '' the unconditional prompt of guidance.

    Args:
        framework (DiffusionSRArch): Built with ``tiny``.
        hq (Tensor): (N, 3, H, W) HQ crops in [0, 1].
        lq (Tensor): (N, 3, H/s, W/s) their LQ images.
        prompts (list[str]): N prompts.
        max_timestep (int | None): Timesteps are drawn from [0, max_timestep) (all by default).
        modules (tuple[str]): Submodules trained (those the framework has).
        patch_size (int | None): Train on random aligned ``patch_size`` px windows of the HQ crops (their latents
            and LQ pixels cut at the same place), as SR diffusion models train on crops; None: whole crops. A
            window costs a quarter of a crop twice its size, so more steps fit the same time.
    """
    generator = generator or torch.Generator().manual_seed(0)
    params = [p for name in modules if isinstance(getattr(framework, name, None), torch.nn.Module)
              for p in getattr(framework, name).parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        latents = framework.encode_images(hq)
    num_train = max_timestep or framework.noise_scheduler.config.num_train_timesteps
    for _ in tqdm(range(steps), desc='pretrain tiny denoiser', leave=False):
        index = torch.randint(0, latents.shape[0], (batch,), generator=generator)
        z, lq_batch = _aligned_windows(latents[index], lq[index], framework, patch_size, generator)
        noise = torch.randn(z.shape, generator=generator)
        t = framework.training_timesteps(batch, 0, num_train, generator=generator)
        dropped = (torch.rand(batch, generator=generator) < 0.2).tolist()
        with torch.no_grad():
            cond = framework.condition(lq_batch, ['' if d else prompts[i] for d, i in zip(dropped, index.tolist())])
        x_t, target = framework.diffusion_inputs(z, noise, t, cond)
        loss = torch.nn.functional.mse_loss(framework.predict_noise(x_t, t, cond), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return framework


def _aligned_windows(latents, lq, framework, patch_size, generator):
    """One random window of ``patch_size`` HQ pixels, on a grid both the latent and the LQ pixels fall on, cut
    from each of (B, C, h, w) ``latents`` and (B, 3, H/s, W/s) ``lq``; the whole tensors when ``patch_size`` is None
    or not smaller than the crops."""
    f, s = framework.vae_scale_factor, framework.scale
    height, width = lq.shape[2] * s, lq.shape[3] * s
    if not patch_size or patch_size >= min(height, width):
        return latents, lq
    step = f * s // math.gcd(f, s)
    top, left = (int(torch.randint(0, (size - patch_size) // step + 1, (), generator=generator)) * step
                 for size in (height, width))
    return (latents[:, :, top // f:(top + patch_size) // f, left // f:(left + patch_size) // f],
            lq[:, :, top // s:(top + patch_size) // s, left // s:(left + patch_size) // s])


def pretrain_tiny_framework(framework, hq, lq, prompts, vae_steps=200, diffusion_steps=300, batch=8, seed=0,
                            max_timestep=None, lr=1e-3, vae_opt=None, denoiser_opt=None):
    """Give a tiny random framework the rudiments of a pretrained SR model, in about a minute on a CPU.

    First the VAE learns to reconstruct the crops (:func:`pretrain_tiny_vae`), then the denoising networks
    learn the diffusion loss on those latents, conditioned on the LQ image and the prompt
    (:func:`pretrain_tiny_denoiser`); finally only the framework's ``trainable`` parts stay trainable.

    Args:
        framework (DiffusionSRArch): Built with ``tiny``; trained in place.
        hq (Tensor): (N, 3, H, W) HQ crops in [0, 1].
        lq (Tensor): (N, 3, H/s, W/s) their LQ images.
        prompts (list[str]): N prompts.
        vae_opt (dict | None): Arguments of :func:`pretrain_tiny_vae` that override ``vae_steps`` / ``batch``
            (e.g. ``lr``, ``patch_size``; :func:`vae_options` of a demo base).
        denoiser_opt (dict | None): Arguments of :func:`pretrain_tiny_denoiser` that override ``diffusion_steps``,
            ``batch`` and ``lr`` (:func:`denoiser_options` of a demo base).
    """
    generator = torch.Generator().manual_seed(seed)
    pretrain_tiny_vae(framework.vae, hq, framework.upsample_lq(lq),
                      **dict(dict(steps=vae_steps, batch=batch), **(vae_opt or {})), generator=generator)
    pretrain_tiny_denoiser(framework, hq, lq, prompts, generator=generator, max_timestep=max_timestep,
                           **dict(dict(steps=diffusion_steps, batch=batch, lr=lr), **(denoiser_opt or {})))
    framework.setup_trainable()
    return framework


def demo_preference_samples(framework, crops, lqs, segmenter):
    """The demo's preference samples: :data:`DEMO_CANDIDATE_SETTINGS` candidates of each LQ, SLIC instances of the
    HQ crop, and each instance's preferred / dispreferred candidate by PSNR (:func:`instance_pairs_by_psnr`).

    Args:
        framework (DiffusionSRArch): The tiny base, loaded back from its saved folders.
        crops (list[tuple[str, np.ndarray, str]]): (sample id, uint8 RGB HQ crop, prompt), as :func:`hq_crops`.
        lqs (list[np.ndarray]): Their LQ images.
        segmenter (SLICSegmenter): Instance segmenter of the HQ crops.

    Yields:
        PreferenceSample: One per crop.
    """
    from dspo_basicsr.preference import PreferenceSample
    from dspo_basicsr.preference.segmentation import segment_instances
    for (sid, hq, prompt), lq in zip(crops, lqs):
        lq_tensor = torch.from_numpy(lq).permute(2, 0, 1)[None].float().div(255)
        candidates = []
        for setting in DEMO_CANDIDATE_SETTINGS:
            generator = torch.Generator().manual_seed(setting['seed'])
            sr = framework.sample(lq_tensor, prompt, steps=setting['steps'], guidance_scale=setting['guidance_scale'],
                                  generator=generator)
            candidates.append(to_uint8_rgb(sr[0]))
        seg = segment_instances(segmenter, hq, min_area=16)
        yield PreferenceSample(
            sid=sid, lq=lq, candidates=candidates, seg=seg, instances=instance_pairs_by_psnr(candidates, hq, seg),
            prompt=prompt, negative_prompt='', gt=hq,
            meta={'candidates': list(DEMO_CANDIDATE_SETTINGS), 'default_candidate': 0, 'source': 'skimage.data'})


def _prefixed_arguments(settings, prefix, function):
    names = inspect.signature(function).parameters
    return {name: settings[prefix + name] for name in names if prefix + name in settings}


def vae_options(settings):
    """The :func:`pretrain_tiny_vae` arguments of a demo base: its ``vae_<argument>`` entries (``vae_steps``,
    ``vae_lr``, ``vae_patch_size``, ...), so every demo pretrains its VAE the same way."""
    return _prefixed_arguments(settings, 'vae_', pretrain_tiny_vae)


def denoiser_options(settings):
    """The :func:`pretrain_tiny_denoiser` arguments of a demo base: its ``diffusion_<argument>`` entries
    (``diffusion_steps``, ``diffusion_patch_size``, ...)."""
    return _prefixed_arguments(settings, 'diffusion_', pretrain_tiny_denoiser)


#: The demo base: tiny VAE and UNet layout, pretraining steps, and where sampling starts (see ControlSD2Arch).
#: A latent factor of 2 (two VAE levels) keeps enough of a 64 px crop for the decoded samples to come within a dB of
#: bicubic; at factor 4 the VAE alone cost 1.6 dB. The UNet then runs on 32 x 32 latents, so its attention sits on
#: the second (16 x 16) level, where the factor-4 base had it, which keeps an iteration's cost.
DEMO_BASE = dict(vae_widths=(16, 32), vae_steps=600, vae_batch=16, vae_lr=3e-3, vae_patch_size=32,
                 unet_down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                 unet_up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
                 diffusion_steps=600, diffusion_patch_size=32, max_timestep=400, start_timestep=250)


def demo_tiny_components(settings, seed=0):
    """The tiny arguments of a demo base's ``Tiny*Arch`` (:mod:`dspo_basicsr.demo.tiny_arch`): its seed, VAE widths
    and ``unet_<option>`` entries."""
    unet = {key[len('unet_'):]: value for key, value in settings.items() if key.startswith('unet_')}
    return {'seed': seed, 'vae_config': {'block_out_channels': tuple(settings['vae_widths'])}, 'unet_config': unet}


def build_demo_data(root='datasets/demo', scale=4, size=64, crops_per_photo=2, n_segments=8, seed=0,
                    overwrite=False, base=None, held_out_pairs=False):
    """Build the whole demo under ``root``: tiny pretrained model, preference set, validation folders.

    Layout::

        root/tiny_sd2/            tiny pretrained SD2-base folder (diffusers layout) + controlnet/
        root/ram/ram_tiny.pth     a tiny random RAM with its tagging head (RAM's key layout), for tag prompts
        root/demo_pref.lmdb       the preference set (docs/preference_lmdb.md)
        root/demo_pref_val.lmdb   with ``held_out_pairs``: the same kind of set built from the validation crops
        root/val/gt, root/val/lq  paired PNG folders for SR validation (other crops)

    Args:
        base (dict | None): Overrides of :data:`DEMO_BASE` (e.g. fewer pretraining steps in tests).
        held_out_pairs (bool): Also write ``demo_pref_val.lmdb``: candidates of the validation crops sampled and
            labelled as the training set's, so the implicit accuracy can be measured on pairs not trained on
            (options/demo/compare_*.yml validate on it).

    Returns:
        dict: paths of the parts and the number of training samples.
    """
    from dspo_basicsr.archs.control_sd2_arch import save_sd_components
    from dspo_basicsr.archs.ram_arch import save_ram_checkpoint
    from dspo_basicsr.demo.tiny_arch import TinyControlSD2Arch
    from dspo_basicsr.demo.tiny_components import tiny_ram_embedder
    from dspo_basicsr.preference import write_preference_lmdb
    from dspo_basicsr.preference.segmentation import SLICSegmenter

    from basicsr.archs import build_network

    settings = dict(DEMO_BASE, **(base or {}))
    os.makedirs(root, exist_ok=True)
    crops = hq_crops(size, crops_per_photo + 1, seed)
    train = [c for i, c in enumerate(crops) if i % (crops_per_photo + 1) != crops_per_photo]
    val = [c for i, c in enumerate(crops) if i % (crops_per_photo + 1) == crops_per_photo]
    train_lq = [degrade(hq, scale, seed=seed * 1000 + index) for index, (_, hq, _) in enumerate(train)]

    def as_tensor(images):
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)

    model_path = os.path.join(root, 'tiny_sd2')
    controlnet_path = os.path.join(model_path, 'controlnet')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = TinyControlSD2Arch(**demo_tiny_components(settings, seed), scale=scale)
        pretrain_tiny_framework(base, as_tensor([hq for _, hq, _ in train]), as_tensor(train_lq),
                                [prompt for _, _, prompt in train], vae_opt=vae_options(settings),
                                denoiser_opt=denoiser_options(settings), max_timestep=settings['max_timestep'],
                                seed=seed)
    save_sd_components(model_path, dict(unet=base.unet, vae=base.vae, text_encoder=base.text_encoder,
                                        tokenizer=base.tokenizer, noise_scheduler=base.noise_scheduler))
    base.controlnet.save_pretrained(controlnet_path)
    # A tagger for `val.sample.prompt_source: tags` (options/demo/test_dspo_demo.yml), as the official SR test
    # scripts prompt with RAM / DAPE tags; random, so it only exercises that path (on the demo crops no tag passes
    # its threshold).
    ram_path = os.path.join(root, 'ram', 'ram_tiny.pth')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        save_ram_checkpoint(tiny_ram_embedder(tagging=True), ram_path)
    framework = build_network(dict(type='ControlSD2Arch', pretrained_model_path=model_path,
                                   controlnet_path=controlnet_path, scale=scale, sampler='ddim',
                                   start_point='lr', start_timestep=settings['start_timestep'])).eval()
    segmenter = SLICSegmenter(n_segments=n_segments, compactness=10.0)

    val_lq = [degrade(hq, scale, seed=seed * 1000 + 500 + index) for index, (_, hq, _) in enumerate(val)]

    def samples(crops, lqs):
        return demo_preference_samples(framework, crops, lqs, segmenter)

    lmdb_path = os.path.join(root, 'demo_pref.lmdb')
    with torch.no_grad():
        write_preference_lmdb(lmdb_path, tqdm(samples(train, train_lq), total=len(train), desc='demo preference set'),
                              scale=scale, overwrite=overwrite, progress=False)
    paths = {}
    stale = os.path.join(root, 'demo_pref_val.lmdb')
    if not held_out_pairs and overwrite and os.path.isdir(stale):
        shutil.rmtree(stale)  # its candidates came from the base just replaced
    if held_out_pairs:
        paths['held_out_pairs'] = os.path.join(root, 'demo_pref_val.lmdb')
        with torch.no_grad():
            write_preference_lmdb(paths['held_out_pairs'],
                                  tqdm(samples(val, val_lq), total=len(val), desc='demo held-out preference set'),
                                  scale=scale, overwrite=overwrite, progress=False)

    for sub in ('gt', 'lq'):
        os.makedirs(os.path.join(root, 'val', sub), exist_ok=True)
    for (sid, hq, _), lq in zip(val, val_lq):
        cv2.imwrite(os.path.join(root, 'val', 'gt', f'{sid}.png'), cv2.cvtColor(hq, cv2.COLOR_RGB2BGR))
        cv2.imwrite(os.path.join(root, 'val', 'lq', f'{sid}.png'), cv2.cvtColor(lq, cv2.COLOR_RGB2BGR))
    return dict(model=model_path, controlnet=controlnet_path, ram=ram_path, preference_set=lmdb_path,
                val=os.path.join(root, 'val'), num_samples=len(train), **paths)


def sample_as_validation(framework, lq, sample_opt):
    """(B, 3, h, w) ``lq`` sampled with a ``val.sample`` block and its seed, as DSPOModel's validation samples."""
    from dspo_basicsr.archs.diffusion_sr_base import sample_with_options
    from dspo_basicsr.archs.sampling_protocols import resolve_sample_options
    sample_opt = resolve_sample_options(sample_opt)  # the seed of a protocol preset too
    return sample_with_options(framework, lq, sample_opt, torch.Generator().manual_seed(int(sample_opt.get('seed', 0))))


def held_out_crops(opt, desc):
    """The (name, uint8 RGB GT, (1, 3, h, w) LQ tensor in [0, 1]) of an option file's paired image validation set,
    in name order, with a progress bar."""
    from dspo_basicsr.preference.work_folder import read_image
    image_set = next(d for d in opt['datasets'].values() if d['type'] == 'PairedImageDataset')
    for name in tqdm(sorted(os.listdir(image_set['dataroot_gt'])), desc=desc):
        lq = read_image(os.path.join(image_set['dataroot_lq'], name))
        yield name, read_image(os.path.join(image_set['dataroot_gt'], name)), \
            torch.from_numpy(lq).permute(2, 0, 1)[None].float().div(255)


@torch.no_grad()
def held_out_samples(option_file, checkpoint, n_segments=8, description='held-out crops'):
    """Samples of a demo model and of its pretrained base on the held-out crops, with the GTs' instances.

    Both sample every ``val`` LQ of the option file's image validation set with its ``val.sample`` settings;
    instances are SLIC segments of the GT (as in the demo set).

    Args:
        option_file (str): A demo training option file (``options/demo/dspo_demo.yml``).
        checkpoint (str | None): ``net_g_*.pth`` written by that run; None: the pretrained base itself.
        n_segments (int): SLIC segments per GT.
        description (str): The progress bar's label.

    Returns:
        tuple[list, list, list, list]: Trained samples, base samples, GTs (uint8 HWC) and label maps.
    """
    from dspo_basicsr.archs.sampling_protocols import resolve_sample_options
    from dspo_basicsr.preference.segmentation import SLICSegmenter, segment_instances
    from dspo_basicsr.utils.checkpoint import read_checkpoint
    from dspo_basicsr.utils.options import read_option_file

    from basicsr.archs import build_network

    opt = read_option_file(option_file)
    sample_opt = resolve_sample_options(opt['val'].get('sample'))  # a protocol preset expanded
    framework = build_network(dict(opt['network_g'])).eval()
    reference = framework.build_reference()
    if checkpoint is not None:
        state = read_checkpoint(checkpoint, what='the trained demo weights')
        framework.load_trainable_state_dict(state, source=f"checkpoint '{checkpoint}'")
    segmenter = SLICSegmenter(n_segments=n_segments, compactness=10.0)
    current, pretrained, gts, segs = [], [], [], []
    for _, gt, lq in held_out_crops(opt, description):
        current.append(to_uint8_rgb(sample_as_validation(framework, lq, sample_opt)[0]))
        with reference.sampling():
            pretrained.append(to_uint8_rgb(sample_as_validation(framework, lq, sample_opt)[0]))
        gts.append(gt)
        segs.append(segment_instances(segmenter, gt, min_area=16))
    return current, pretrained, gts, segs


def held_out_win_rate(option_file, checkpoint, n_segments=8):
    """Instance win rate of a trained demo model over its pretrained base on the held-out crops.

    Samples as :func:`held_out_samples`; instances are judged by :func:`instance_win_rate`.

    Args:
        option_file (str): A demo training option file (``options/demo/dspo_demo.yml``).
        checkpoint (str): ``net_g_*.pth`` written by that run.

    Returns:
        dict: :func:`instance_win_rate`'s counts plus ``psnr_trained`` / ``psnr_pretrained`` (mean, dB).
    """
    from basicsr.metrics import calculate_psnr

    current, pretrained, gts, segs = held_out_samples(option_file, checkpoint, n_segments, 'held-out win rate')
    result = instance_win_rate(current, pretrained, gts, segs)
    for key, images in (('psnr_trained', current), ('psnr_pretrained', pretrained)):
        result[key] = float(np.mean([calculate_psnr(i, g, crop_border=4) for i, g in zip(images, gts)]))
    return result
