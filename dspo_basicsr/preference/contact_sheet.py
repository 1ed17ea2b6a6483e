"""Contact sheets of preference samples: LQ | candidates | label-map overlay, preferences marked.

One row per sample: the LQ (nearest-upscaled to SR size), each candidate ``c{n}`` (the default one
labelled ``default``), and the label map blended over the default candidate with each instance's id. On
each candidate tile the paired instances it wins are outlined in green and those it loses in red, with
the instance id; the overlay tile writes ``id: +win -lose`` at each paired instance.
"""
import os

import cv2
import numpy as np

__all__ = ['make_contact_sheet', 'write_contact_sheets', 'label_colours']

GREEN, RED, WHITE, BLACK = (40, 200, 40), (230, 40, 40), (255, 255, 255), (0, 0, 0)


def label_colours(num):
    """(num, 3) uint8 distinct, deterministic colours."""
    rng = np.random.default_rng(12345)
    return rng.integers(40, 256, size=(max(num, 1), 3), dtype=np.int64).astype(np.uint8)


def _text(image, text, org, colour=WHITE, scale=0.5):
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, BLACK, 3, cv2.LINE_AA)
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def _outline(image, mask, colour):
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, colour, 2)


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return int(xs.mean()), int(ys.mean())


def make_contact_sheet(lq, candidates, seg, instances, default_candidate=None, height=256, title=None):
    """One sample's sheet.

    Args:
        lq (np.ndarray): (h, w, 3) uint8 RGB.
        candidates (list[np.ndarray]): N (H, W, 3) uint8 RGB.
        seg (np.ndarray): (H, W) integer label map.
        instances (list[dict]): Rows with ``id``, ``win``, ``lose``.
        default_candidate (int, optional): Index of the default setting's candidate.
        height (int): Tile height in pixels (tiles keep the aspect ratio). Default: 256.
        title (str, optional): Written at the top-left of the LQ tile (e.g. the sample id).

    Returns:
        np.ndarray: (height, width, 3) uint8 RGB.
    """
    sr_h, sr_w = seg.shape
    # draw at display resolution, so outlines and labels have the same size whatever the SR size
    width = max(1, round(sr_w * height / sr_h))
    upscale = height >= sr_h

    def show(image):
        mode = cv2.INTER_NEAREST if upscale else cv2.INTER_AREA
        return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=mode)

    labels = cv2.resize(seg.astype(np.int32), (width, height), interpolation=cv2.INTER_NEAREST)
    paired = [inst for inst in instances if inst.get('win', -1) >= 0 and inst.get('lose', -1) >= 0]
    masks = {inst['id']: labels == inst['id'] for inst in instances}
    tiles = [(cv2.resize(np.ascontiguousarray(lq), (width, height), interpolation=cv2.INTER_NEAREST),
              'LQ' if title is None else f'{title} LQ')]
    for n, candidate in enumerate(candidates):
        tile = show(candidate)
        for inst in paired:
            mask = masks[inst['id']]
            if not mask.any():
                continue
            if inst['win'] == n:
                _outline(tile, mask, GREEN)
                _text(tile, f'+{inst["id"]}', _centroid(mask), GREEN)
            elif inst['lose'] == n:
                _outline(tile, mask, RED)
                _text(tile, f'-{inst["id"]}', _centroid(mask), RED)
        tiles.append((tile, f'c{n}' + (' default' if n == default_candidate else '')))
    base = show(candidates[default_candidate if default_candidate is not None else 0])
    colours = label_colours(int(seg.max()) + 1)
    overlay = (0.5 * base + 0.5 * colours[labels]).astype(np.uint8)
    for inst in instances:
        mask = masks[inst['id']]
        if not mask.any():
            continue
        label = f'{inst["id"]}'
        if inst in paired:
            label += f': +{inst["win"]} -{inst["lose"]}'
        _text(overlay, label, _centroid(mask))
    tiles.append((overlay, 'instances (+win -lose)'))

    row = []
    for tile, caption in tiles:
        _text(tile, caption, (4, 14), WHITE, 0.45)
        row.append(tile)
        row.append(np.full((height, 4, 3), 255, np.uint8))
    return np.concatenate(row[:-1], axis=1)


def write_contact_sheets(samples, out_dir, height=256, progress=True):
    """Write ``out_dir/<sid>.png`` for each sample.

    Args:
        samples (Iterable[PreferenceSample]): e.g. ``PreferenceLMDB(path)[sid]`` for each id, or
            ``WorkFolder.load_sample``.
        out_dir (str): Output folder.
        height (int): Tile height.
        progress (bool): Show a progress bar.

    Returns:
        list[str]: Written paths.
    """
    from tqdm import tqdm

    from dspo_basicsr.preference.pipeline import write_image

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for sample in tqdm(samples, desc='contact sheets', disable=not progress, unit='img'):
        sheet = make_contact_sheet(sample.lq, sample.candidates, sample.seg, sample.instances,
                                   default_candidate=sample.meta.get('default_candidate'), height=height,
                                   title=sample.sid)
        path = os.path.join(out_dir, f'{sample.sid}.png')
        write_image(path, sheet)
        paths.append(path)
    return paths
