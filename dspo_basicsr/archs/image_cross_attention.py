"""SeeSR's image cross-attention, built on the installed diffusers without a fork.

Every text cross-attention transformer of a UNet / ControlNet (``..._blocks.N.attentions.M`` and
``mid_block.attentions.0``) gets a partner transformer of the same shape, ``..._blocks.N.image_attentions.M``,
whose keys and values are RAM image embeddings (B, 145, 512) instead of the text embeddings; the embeddings
travel in ``cross_attention_kwargs`` (:func:`image_kwargs`). Used by :mod:`.seesr_arch` (and so AddSR).
diffusers is imported on first use, not when the arch files are imported to fill BasicSR's registry.
"""
import functools

from torch import nn

# ImageCrossAttentionTransformer2DModel is there too, defined on first access (module __getattr__).
__all__ = ['IMAGE_EMBEDS_KEY', 'SEESR_IMAGE_DIM', 'add_image_cross_attention', 'image_kwargs']

IMAGE_EMBEDS_KEY = 'image_encoder_hidden_states'
SEESR_IMAGE_DIM = 512


@functools.lru_cache(maxsize=None)
def _image_cross_attention_class():
    """:class:`ImageCrossAttentionTransformer2DModel`, defined on first use.

    Importing the arch files fills BasicSR's registry; defining the subclass there would import diffusers in
    every process that imports the package, including those that never build a diffusion network.
    """
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    class ImageCrossAttentionTransformer2DModel(Transformer2DModel):
        """A text cross-attention transformer followed by its image cross-attention partner (SeeSR).

        The partner is registered in the block's ``image_attentions`` list (so checkpoint keys are SeeSR's);
        this module only holds a plain reference to it, which ``copy.deepcopy`` of the whole network remaps.
        The image embeddings arrive as ``cross_attention_kwargs['image_encoder_hidden_states']`` (B, L, D).
        """

        def forward(self, hidden_states, encoder_hidden_states=None, cross_attention_kwargs=None, attention_mask=None,
                    return_dict=True, **kwargs):
            kwargs_rest = dict(cross_attention_kwargs or {})
            image_states = kwargs_rest.pop(IMAGE_EMBEDS_KEY, None)
            if image_states is None:
                raise ValueError('SeeSR image cross-attention needs the RAM image embeddings: call the network with '
                                 f"cross_attention_kwargs={{'{IMAGE_EMBEDS_KEY}': embeds}} (B, 145, 512).")
            kwargs_rest = kwargs_rest or None
            hidden_states = super().forward(
                hidden_states, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=kwargs_rest,
                attention_mask=attention_mask, return_dict=False, **kwargs)[0]
            hidden_states = self.__dict__['_image_partner'](
                hidden_states, encoder_hidden_states=image_states, cross_attention_kwargs=kwargs_rest,
                attention_mask=attention_mask, return_dict=False)[0]
            return (hidden_states,) if not return_dict else type(self).output_class(sample=hidden_states)

    ImageCrossAttentionTransformer2DModel.output_class = Transformer2DModelOutput
    ImageCrossAttentionTransformer2DModel.__qualname__ = 'ImageCrossAttentionTransformer2DModel'  # pickled by name
    return ImageCrossAttentionTransformer2DModel


def __getattr__(name):
    if name == 'ImageCrossAttentionTransformer2DModel':
        return _image_cross_attention_class()
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")


def add_image_cross_attention(model, image_cross_attention_dim=SEESR_IMAGE_DIM):
    """Give every text cross-attention transformer of a UNet / ControlNet an image cross-attention partner.

    Adds ``block.image_attentions`` (one ``Transformer2DModel`` per ``block.attentions`` entry, same shape,
    cross-attention width ``image_cross_attention_dim``) to the down, mid and up blocks, and records
    ``use_image_cross_attention`` / ``image_cross_attention_dim`` in the model's config, as SeeSR's configs do.

    Args:
        model (UNet2DConditionModel | ControlNetModel): Modified in place (works on the ``meta`` device).
        image_cross_attention_dim (int): Width of the image embeddings (512 for RAM).

    Returns:
        The same model.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    blocks = list(model.down_blocks) + [model.mid_block] + list(getattr(model, 'up_blocks', []))
    for block in blocks:
        attentions = getattr(block, 'attentions', None)
        if attentions is None or hasattr(block, 'image_attentions'):
            continue
        partners = []
        for text_attention in attentions:
            if not isinstance(text_attention, Transformer2DModel):
                raise TypeError(f'{type(block).__name__} holds a {type(text_attention).__name__}; SeeSR image '
                                'cross-attention needs Transformer2DModel text attentions.')
            config = dict(text_attention.config)
            config = {k: v for k, v in config.items() if not k.startswith('_')}
            config['cross_attention_dim'] = image_cross_attention_dim
            partner = Transformer2DModel(**config)
            text_attention.__class__ = _image_cross_attention_class()
            # A plain attribute, not a registered submodule: the partner's keys live under image_attentions.
            text_attention.__dict__['_image_partner'] = partner
            partners.append(partner)
        block.image_attentions = nn.ModuleList(partners)
    model.register_to_config(use_image_cross_attention=True, image_cross_attention_dim=image_cross_attention_dim)
    return model


def image_kwargs(image_embeds):
    """The ``cross_attention_kwargs`` that carry RAM image embeddings (B, L, D) into a SeeSR network."""
    return {IMAGE_EMBEDS_KEY: image_embeds}
