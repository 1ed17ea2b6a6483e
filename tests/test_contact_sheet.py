"""Contact sheets a reader trusts: GT tile, scores, labels inside, distinct neighbours, inner outlines."""
import numpy as np

from dspo_basicsr.preference.contact_sheet import GREEN, RED, label_colours, make_contact_sheet


def _sample():
    seg = np.zeros((32, 32), np.int64)
    seg[:, 16:] = 1
    seg[24:, :16] = 2
    rng = np.random.default_rng(0)
    candidates = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    gt = np.full((32, 32, 3), 90, np.uint8)
    instances = [{'id': 0, 'win': 1, 'lose': 0, 'scores': {'psnr': [20.0, 25.5, 22.0]}},
                 {'id': 1, 'win': 2, 'lose': 0, 'scores': {'psnr': [19.0, 21.0, 23.25]}},
                 {'id': 2, 'win': -1, 'lose': -1, 'scores': {'psnr': [20.0, 20.0, 20.0]}}]
    return np.zeros((8, 8, 3), np.uint8), candidates, seg, instances, gt


def test_sheet_has_gt_tile_score_band_and_overlay_on_gt():
    lq, candidates, seg, instances, gt = _sample()
    sheet = make_contact_sheet(lq, candidates, seg, instances, default_candidate=0, height=64, gt=gt)
    tiles = 1 + 3 + 1 + 1  # LQ, c0..c2, GT, overlay
    assert sheet.shape[1] == tiles * 64 + (tiles - 1) * 4 and sheet.shape[0] > 64  # a band of scores below
    tile = lambda k: sheet[:64, k * 68:k * 68 + 64]  # noqa: E731
    assert (tile(4)[20:, :] == 90).all(-1).mean() > 0.9  # the GT tile (the caption aside)
    band = sheet[64:, 68:132]  # under c0
    assert (band < 128).any()  # c0's scores are written
    # the overlay blends the label colours with the GT (uniform 90), not a candidate's noise
    overlay = tile(5)[40:60, 40:60].reshape(-1, 3)
    assert len(np.unique(overlay, axis=0)) <= 4


def test_outlines_follow_inner_borders_not_the_image_edge():
    lq, candidates, seg, instances, gt = _sample()
    sheet = make_contact_sheet(lq, candidates, seg, instances, default_candidate=0, height=64)
    c0 = sheet[:64, 68:132]
    red = (c0 == np.array(RED, np.uint8)).all(-1)
    assert red.any()
    # the image edges stay unframed: only the few px where an inner border meets them
    assert all(edge.sum() <= 4 for edge in (red[0], red[-1], red[:, 0], red[:, -1]))
    assert red[:, 30:34].any()  # the border between instances 0 and 1 (at x = 32 of 64)
    c1 = sheet[:64, 136:200]
    assert (c1 == np.array(GREEN, np.uint8)).all(-1).any()


def test_neighbouring_instances_get_distinct_colours():
    seg = np.arange(16).reshape(4, 4).repeat(4, 0).repeat(4, 1)  # a 4 x 4 grid of instances
    colours = label_colours(16, seg)
    for a, b in ((seg[:, :-1], seg[:, 1:]), (seg[:-1], seg[1:])):
        for u, v in set(zip(a[a != b].tolist(), b[a != b].tolist())):
            assert tuple(colours[u]) != tuple(colours[v]), (u, v)


def test_score_band_reads_both_score_layouts():
    lq, candidates, seg, instances, gt = _sample()
    instances[0]['scores'] = [{'psnr': 20.0, 'lpips': 0.3}, {'psnr': 25.5, 'lpips': 0.2}, {'psnr': 22.0, 'lpips': 0.25}]
    instances[1]['scores'] = {'vlm_reason': 'sharper fur'}  # no numbers: nothing to write for it
    sheet = make_contact_sheet(lq, candidates, seg, instances, default_candidate=0, height=64)
    assert sheet.shape[0] == 64 + 14 + 6  # one line (instance 0) under each candidate
