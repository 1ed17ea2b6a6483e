"""Contact sheets of preference samples: LQ | candidates | GT | label-map overlay, preferences marked.

One row per sample: the LQ (nearest-upscaled to SR size), each candidate ``c{n}`` (the default one
labelled ``default``), the GT when the sample has one, and the label map blended over the image it was
segmented from (the GT when there is one, else the default candidate) with each instance's id. One
notation throughout: instances are ``#m``, candidates ``c{n}``. On each candidate tile the paired
instances it wins are outlined in green (``+#m``) and those it loses in red (``-#m``); the overlay writes
``#m c{win}>c{lose}``; with per-instance scores, a band under each candidate lists its score per paired
instance. Outlines follow instance borders inside the image only, labels are kept inside their tile,
and neighbouring instances get distinct colours.
"""
import os

import cv2
import numpy as np

__all__ = ['make_contact_sheet', 'write_contact_sheets', 'label_colours']

GREEN, RED, WHITE, BLACK = (40, 200, 40), (230, 40, 40), (255, 255, 255), (0, 0, 0)


#: 12 well-separated colours (RGB); neighbouring instances never share one (see :func:`label_colours`).
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
                    (170, 110, 40)], np.uint8)


def label_colours(num, seg=None):
    """(num, 3) uint8 deterministic colours; with the label map ``seg``, touching instances differ.

    Greedy graph colouring of the instances' adjacency (4-neighbourhood) over :data:`PALETTE`.
    """
    num = max(num, 1)
    if seg is None:
        return PALETTE[np.arange(num) % len(PALETTE)]
    neighbours = {m: set() for m in range(num)}
    for a, b in ((seg[:, :-1], seg[:, 1:]), (seg[:-1], seg[1:])):
        touching = a != b
        for u, v in set(zip(a[touching].tolist(), b[touching].tolist())):
            if 0 <= u < num and 0 <= v < num:
                neighbours[u].add(v)
                neighbours[v].add(u)
    index = {}
    for m in sorted(neighbours, key=lambda m: -len(neighbours[m])):
        used = {index[n] for n in neighbours[m] if n in index}
        index[m] = next(i for i in range(len(PALETTE) + len(used) + 1) if i not in used)
    return PALETTE[np.array([index[m] for m in range(num)]) % len(PALETTE)]


def _text_size(text, scale):
    (w, h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 3)
    return w, h + baseline


def _text(image, text, org, colour=WHITE, scale=0.5):
    """Draw ``text`` with its lower-left corner at ``org``, moved so that it stays inside ``image``."""
    w, h = _text_size(text, scale)
    x = int(np.clip(org[0], 1, max(1, image.shape[1] - w - 1)))
    y = int(np.clip(org[1], h, max(h, image.shape[0] - 2)))
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, BLACK, 3, cv2.LINE_AA)
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return x, y - h, x + w, y


def _outline(image, mask, colour):
    """Colour the instance's border pixels (2 px) where it meets another instance, not the image edge."""
    mask = mask.astype(np.uint8)
    inner = cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    border = cv2.dilate(mask - inner, np.ones((2, 2), np.uint8)).astype(bool) & mask.astype(bool)
    image[border] = colour


def _anchor(mask, text, scale):
    """Where ``text`` sits inside ``mask``: centred on the pixel deepest inside it (not the centroid,
    which can fall outside a non-convex instance)."""
    depth = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    w, h = _text_size(text, scale)
    return int(x - w / 2), int(y + h / 2)


def _place(image, text, mask, colour, scale, taken):
    """Draw ``text`` in ``mask``, shifted down until it does not overlap a label already in ``taken``."""
    x, y = _anchor(mask, text, scale)
    _, h = _text_size(text, scale)
    for _ in range(8):
        box = _text(image.copy(), text, (x, y), colour, scale)
        if not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
            break
        y += h
    taken.append(_text(image, text, (x, y), colour, scale))


def make_contact_sheet(lq, candidates, seg, instances, default_candidate=None, height=256, title=None, gt=None):
    """One sample's sheet.

    Args:
        lq (np.ndarray): (h, w, 3) uint8 RGB.
        candidates (list[np.ndarray]): N (H, W, 3) uint8 RGB.
        seg (np.ndarray): (H, W) integer label map.
        instances (list[dict]): Rows with ``id``, ``win``, ``lose`` and optionally ``scores``
            (metric name -> one value per candidate).
        default_candidate (int, optional): Index of the default setting's candidate.
        height (int): Tile height in pixels (tiles keep the aspect ratio). Default: 256.
        title (str, optional): Written at the top-left of the LQ tile (e.g. the sample id).
        gt (np.ndarray, optional): (H, W, 3) uint8 RGB ground truth: adds a GT tile, and the label map is
            drawn over it (it is what the pipeline segments when there is a GT).

    Returns:
        np.ndarray: (height [+ score band], width, 3) uint8 RGB.
    """
    sr_h, sr_w = seg.shape
    # draw at display resolution, so outlines and labels have the same size whatever the SR size
    width = max(1, round(sr_w * height / sr_h))
    upscale = height >= sr_h
    scale = 0.45 if height >= 128 else 0.3

    def show(image):
        mode = cv2.INTER_NEAREST if upscale else cv2.INTER_AREA
        return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=mode)

    labels = cv2.resize(seg.astype(np.int32), (width, height), interpolation=cv2.INTER_NEAREST)
    paired = [inst for inst in instances if inst.get('win', -1) >= 0 and inst.get('lose', -1) >= 0]
    masks = {inst['id']: labels == inst['id'] for inst in instances}
    tiles = [(cv2.resize(np.ascontiguousarray(lq), (width, height), interpolation=cv2.INTER_NEAREST),
              'LQ' if title is None else f'{title} LQ')]
    for n, candidate in enumerate(candidates):
        tile, taken = show(candidate), [(0, 0, width, 18)]  # keep the caption's corner free
        for inst in paired:
            mask = masks[inst['id']]
            if not mask.any() or n not in (inst['win'], inst['lose']):
                continue
            colour, sign = (GREEN, '+') if inst['win'] == n else (RED, '-')
            _outline(tile, mask, colour)
            _place(tile, f'{sign}#{inst["id"]}', mask, colour, scale, taken)
        tiles.append((tile, f'c{n}' + (' default' if n == default_candidate else '')))
    if gt is not None:
        tiles.append((show(gt), 'GT'))
    segmented = gt if gt is not None else candidates[default_candidate if default_candidate is not None else 0]
    colours = label_colours(int(seg.max()) + 1, seg)
    overlay = (0.5 * show(segmented) + 0.5 * colours[labels]).astype(np.uint8)
    taken = [(0, 0, width, 18)]
    for inst in instances:
        mask = masks[inst['id']]
        if not mask.any():
            continue
        label = f'#{inst["id"]}'
        if inst in paired:
            label += f' c{inst["win"]}>c{inst["lose"]}'
        _place(overlay, label, mask, WHITE, scale, taken)
    tiles.append((overlay, 'instances on ' + ('GT' if gt is not None else 'default candidate')))

    band = _score_band(candidates, paired, width, 1 + len(candidates), gt is not None)
    row = []
    for k, (tile, caption) in enumerate(tiles):
        _text(tile, caption, (4, 14), WHITE, 0.45)
        if band is not None:
            tile = np.concatenate([tile, band[k]], axis=0)
        row.append(tile)
        row.append(np.full((tile.shape[0], 4, 3), 255, np.uint8))
    return np.concatenate(row[:-1], axis=1)


def _candidate_scores(scores, n):
    """Candidate n's numeric scores from an instance's ``scores``: a list with one dict per candidate
    (the metric / BIQA scorers) or a dict of metric name -> one value per candidate (the demo)."""
    if isinstance(scores, (list, tuple)):
        entry = scores[n] if n < len(scores) and isinstance(scores[n], dict) else {}
    elif isinstance(scores, dict):
        entry = {k: v[n] for k, v in scores.items() if isinstance(v, (list, tuple)) and n < len(v)}
    else:
        entry = {}
    return {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _score_band(candidates, paired, width, num_tiles, has_gt):
    """White bands under the tiles; under candidate n, ``#m metric value`` per paired instance.

    Returns:
        list[np.ndarray] | None: one band per tile, or None when no instance has scores.
    """
    lines_per_candidate = [[f'#{inst["id"]} ' + ' '.join(f'{name} {value:.2f}' for name, value in numbers.items())
                            for inst in paired for numbers in [_candidate_scores(inst.get('scores'), n)] if numbers]
                           for n in range(len(candidates))]
    if not any(lines_per_candidate):
        return None
    line = 14
    band_h = line * max(len(lines) for lines in lines_per_candidate) + 6
    bands = [np.full((band_h, width, 3), 255, np.uint8) for _ in range(num_tiles + has_gt + 1)]
    for n, lines in enumerate(lines_per_candidate):
        for i, text in enumerate(lines):
            cv2.putText(bands[1 + n], text, (3, (i + 1) * line), cv2.FONT_HERSHEY_SIMPLEX, 0.35, BLACK, 1,
                        cv2.LINE_AA)
    return bands


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
                                   title=sample.sid, gt=sample.gt)
        path = os.path.join(out_dir, f'{sample.sid}.png')
        write_image(path, sheet)
        paths.append(path)
    return paths
