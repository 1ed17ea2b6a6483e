"""Instances for DSPO: masks -> partition label maps, SLIC, and SAM loaded from a local tiny checkpoint."""
from functools import partial

import numpy as np
import pytest
import torch

from dspo_basicsr.preference.segmentation import (
    SAMSegmenter,
    SLICSegmenter,
    build_segmenter,
    is_partition,
    masks_to_partition,
    segment_instances,
)

TINY_SAM_ARCH = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1, ), image_size=64, patch_size=16,
                     window_size=2, prompt_embed_dim=32, decoder_depth=1, decoder_mlp_dim=32, decoder_num_heads=2,
                     iou_head_hidden_dim=32)


def box(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def assert_partition(seg, shape):
    assert seg.dtype == np.uint16 and seg.shape == shape
    assert is_partition(seg), np.unique(seg)


def test_overlapping_masks_smaller_on_top_and_ids_by_area():
    shape = (20, 20)
    big = box(shape, 0, 20, 0, 20)
    mid = box(shape, 0, 10, 0, 20)
    small = box(shape, 2, 6, 2, 6)  # inside mid
    seg = masks_to_partition([small, big, mid])
    assert_partition(seg, shape)
    # painted big -> mid -> small; ids by decreasing visible area: big's lower half (200 px), mid (184), small (16)
    assert len(np.unique(seg)) == 3
    assert seg[15, 15] == 0 and seg[8, 8] == 1 and seg[3, 3] == 2
    assert (seg[small] == 2).all()
    assert list(np.bincount(seg.ravel())) == [200, 184, 16]


def test_holes_become_one_background_instance_or_join_neighbours():
    shape = (16, 16)
    left, right = box(shape, 0, 16, 0, 6), box(shape, 0, 16, 10, 16)
    seg = masks_to_partition([left, right], uncovered='background')
    assert_partition(seg, shape)
    assert len(np.unique(seg)) == 3
    assert len(np.unique(seg[:, 6:10])) == 1 and seg[0, 7] not in (seg[0, 0], seg[0, 15])

    seg = masks_to_partition([left, right], uncovered='neighbours')
    assert_partition(seg, shape)
    assert len(np.unique(seg)) == 2
    assert seg[0, 6] == seg[0, 0] and seg[0, 9] == seg[0, 15]


def test_tiny_masks_merge_into_largest_neighbour():
    shape = (20, 20)
    top, bottom = box(shape, 0, 8, 0, 20), box(shape, 8, 20, 0, 20)
    speck = box(shape, 7, 9, 5, 7)  # 4 px, straddles both: bottom is the larger neighbour
    lone = box(shape, 15, 16, 15, 16)  # 1 px inside bottom
    seg = masks_to_partition([top, bottom, speck, lone], min_area=5)
    assert_partition(seg, shape)
    assert len(np.unique(seg)) == 2
    assert seg[7, 5] == seg[19, 0] and seg[15, 15] == seg[19, 0]
    assert seg[0, 0] != seg[19, 0]


def test_no_mask_at_all_gives_one_instance():
    seg = masks_to_partition([], shape=(5, 7))
    assert_partition(seg, (5, 7))
    assert (seg == 0).all()
    seg = masks_to_partition([np.zeros((5, 7), bool)], uncovered='neighbours', min_area=3)
    assert (seg == 0).all()
    with pytest.raises(ValueError, match='shape'):
        masks_to_partition([])


def test_random_masks_always_partition():
    rng = np.random.default_rng(0)
    shape = (24, 24)
    for _ in range(20):
        masks = []
        for _ in range(rng.integers(0, 8)):
            y0, x0 = rng.integers(0, 20, size=2)
            masks.append(box(shape, y0, y0 + rng.integers(1, 12), x0, x0 + rng.integers(1, 12)))
        for uncovered in ('background', 'neighbours'):
            seg = masks_to_partition(masks, shape=shape, min_area=int(rng.integers(0, 30)), uncovered=uncovered)
            assert_partition(seg, shape)


def test_slic_segmenter_partition():
    rng = np.random.default_rng(1)
    image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    image[:16] = 20
    seg = segment_instances(SLICSegmenter(n_segments=6), image, min_area=10)
    assert_partition(seg, (32, 32))
    assert np.bincount(seg.ravel()).min() >= 10
    assert isinstance(build_segmenter({'type': 'SLIC', 'n_segments': 4}), SLICSegmenter)


def tiny_sam():
    """A randomly initialised SAM built directly from segment-anything's classes."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    a = TINY_SAM_ARCH
    torch.manual_seed(0)
    return Sam(
        image_encoder=ImageEncoderViT(depth=a['depth'], embed_dim=a['embed_dim'], img_size=a['image_size'], mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=a['num_heads'],
                                      patch_size=a['patch_size'], qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=a['global_attn_indexes'], window_size=a['window_size'],
                                      out_chans=a['prompt_embed_dim']),
        prompt_encoder=PromptEncoder(embed_dim=a['prompt_embed_dim'], image_embedding_size=(4, 4),
                                     input_image_size=(64, 64), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=a['prompt_embed_dim'], mlp_dim=32,
                                                               num_heads=2),
                                 transformer_dim=a['prompt_embed_dim'], iou_head_depth=3, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def save_tiny_sam(path):
    model = tiny_sam()
    torch.save(model.state_dict(), str(path))
    return model


def test_tiny_sam_loads_from_local_checkpoint_and_segments(tmp_path):
    ckpt = tmp_path / 'sam_tiny.pth'
    reference = save_tiny_sam(ckpt)
    segmenter = SAMSegmenter(ckpt, model_type='vit_b', arch=TINY_SAM_ARCH, points_per_side=4, pred_iou_thresh=0.0,
                             stability_score_thresh=0.0, box_nms_thresh=0.7)
    for name, value in reference.state_dict().items():
        assert torch.equal(segmenter.model.state_dict()[name], value), name
    image = (np.random.default_rng(2).random((48, 40, 3)) * 255).astype(np.uint8)
    masks = segmenter(image)
    assert all(m.shape == (48, 40) and m.dtype == bool for m in masks)
    seg = segment_instances(segmenter, image, min_area=4)
    assert_partition(seg, (48, 40))
    assert segmenter.describe()['type'] == 'SAM'


def test_sam_missing_or_mismatched_checkpoint_errors(tmp_path):
    missing = tmp_path / 'nope' / 'sam_vit_b_01ec64.pth'
    with pytest.raises(FileNotFoundError, match='sam_vit_b_01ec64.pth'):
        SAMSegmenter(missing, model_type='vit_b')
    ckpt = tmp_path / 'sam_tiny.pth'
    save_tiny_sam(ckpt)
    with pytest.raises(ValueError, match='does not match model_type'):
        SAMSegmenter(ckpt, model_type='vit_b', arch=dict(TINY_SAM_ARCH, embed_dim=64))
    with pytest.raises(ValueError, match='Unknown SAM model_type'):
        SAMSegmenter(ckpt, model_type='vit_x')
    # a pickled object is refused by weights_only loading
    bad = tmp_path / 'pickled.pth'
    torch.save({'x': object()}, str(bad))
    with pytest.raises(ValueError, match='weights_only'):
        SAMSegmenter(bad, model_type='vit_b', arch=TINY_SAM_ARCH)
