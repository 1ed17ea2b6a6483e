"""The official test protocol of each framework, by name: ``val.sample.protocol`` in an option file.

A training file and its test file both write ``sample: {protocol: seesr}``, so the metrics watched during
training are those ``basicsr test`` and the papers report, and the two files cannot drift apart. Keys set
next to ``protocol`` override the preset's (``{protocol: seesr, steps: 20}`` for a quicker validation).

Each value follows the framework's official test script; the upstream argument is cited beside it.
"""

#: preset name -> ``val.sample`` keys (see :meth:`~dspo_basicsr.archs.diffusion_sr_base.DiffusionSRArch.sample`)
SAMPLING_PROTOCOLS = {
    # cswry/SeeSR test_seesr.py
    'seesr': {
        'steps': 50,             # --num_inference_steps 50
        'guidance_scale': 5.5,   # --guidance_scale 5.5
        'seed': 0,
        'sampler': 'ddpm',       # DDPMScheduler (pipeline_seesr.py)
        'prompt': '',            # --prompt '' : the user prompt, after the tags
        'prompt_source': 'tags',  # f"{DAPE tags}, {prompt}," + "clean, high-resolution, 8k"
        'color_fix': 'adain',    # --align_method adain
        'process_size': 512,     # --process_size 512
        'tile_size': 96,         # --latent_tiled_size 96
        'tile_overlap': 4,       # --latent_tiled_overlap 4
        'vae_tile': True,        # tiled VAE for large images
    },
    # NJU-PCALab/AddSR test_addsr.py: 4 steps at t = 999, 749, 499, 249 with self-refinement, no guidance
    'addsr': {
        'steps': 4,
        'guidance_scale': 1.0,   # guidance unused (pipeline_addsr.py)
        'seed': 0,
        'prompt': '',
        'prompt_source': 'tags',  # f"{DAPE tags}, {prompt}," + --added_prompt
        'color_fix': 'adain',    # --align_method adain
        'process_size': 512,     # --process_size 512
        'tile_size': 320,        # --latent_tiled_size 320
        'tile_overlap': 4,       # --latent_tiled_overlap 4
        'vae_tile': True,
    },
    # cswry/OSEDiff test_osediff.py: one step at t = 999 from the LQ latent, no guidance
    'osediff': {
        'steps': 1,
        'guidance_scale': 1.0,
        'seed': 0,
        'prompt': '',
        'prompt_source': 'tags',  # f"{DAPE tags of the x4 LQ}, {prompt},"
        'color_fix': 'adain',    # --align_method adain
        'process_size': 512,     # --process_size 512
        'tile_size': 96,         # --latent_tiled_size 96
        'tile_overlap': 32,      # --latent_tiled_overlap 32
        'vae_tile': True,
    },
    # SD2.1 + an SR ControlNet (no official SR test script): SeeSR's sampler, without tags or tiling
    'sd21': {
        'steps': 50,
        'guidance_scale': 5.5,
        'seed': 0,
        'sampler': 'ddpm',
        'prompt': '',
    },
}


def resolve_sample_options(options):
    """A ``val.sample`` block with its ``protocol`` preset expanded; keys set in the block override the preset.

    Args:
        options (dict | None): The ``val.sample`` block of an option file.

    Returns:
        dict: The sampling settings, without the ``protocol`` key (so resolving twice changes nothing).

    Raises:
        ValueError: An unknown protocol, or the old name ``cfg`` of ``guidance_scale``.
    """
    options = dict(options or {})
    if 'cfg' in options:
        raise ValueError("the sampling option 'cfg' was renamed to 'guidance_scale'.")
    name = options.pop('protocol', None)
    if name is None:
        return options
    if name not in SAMPLING_PROTOCOLS:
        raise ValueError(f"val.sample.protocol '{name}' is unknown; choose one of {sorted(SAMPLING_PROTOCOLS)} or "
                         'remove the key and set the sampling keys yourself.')
    return {**SAMPLING_PROTOCOLS[name], **options}
