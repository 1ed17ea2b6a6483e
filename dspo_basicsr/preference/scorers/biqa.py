"""The BIQA scorer: a blind quality model (the calibrated BIQA network) on each instance's crops, and its loader."""
import os

import numpy as np

from dspo_basicsr.preference.scorers.base import InstanceScorer, ScorerItemError, instance_box, json_float, pick_pair

__all__ = ['BIQAInstanceScorer', 'load_biqa_quality']


def _stack_crops(context, instance_id, min_crop):
    """(K, 3, h, w) float [0, 1] bounding-box crops of instance ``instance_id`` in every candidate."""
    import torch
    y0, y1, x0, x1 = instance_box(context.seg == instance_id, min_crop)
    crops = np.stack([c[y0:y1, x0:x1] for c in context.candidates])  # (K, h, w, 3)
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0  # (K, h, w, 3) -> (K, 3, h, w)


class BIQAInstanceScorer(InstanceScorer):
    """A blind quality model on each candidate's bounding-box crop of the instance; higher is better.

    Args:
        quality (callable): ``quality(crops)`` with crops (K, 3, h, w) float in [0, 1] -> (K,) scores
            (:func:`load_biqa_quality` builds one from the calibrated BIQA network).
        min_crop (int): Bounding boxes grow to at least this size. Default: 64.
    """

    name = 'biqa'

    def __init__(self, quality, min_crop=64):
        self.quality = quality
        self.min_crop = int(min_crop)

    def score_instance(self, context, instance_id):
        import torch
        crops = _stack_crops(context, instance_id, self.min_crop)
        with torch.no_grad():
            scores = torch.as_tensor(self.quality(crops)).detach().float().reshape(-1).cpu().numpy()
        if scores.shape[0] != len(context.candidates):
            raise ScorerItemError(f'Sample {context.sid!r}, instance {instance_id}: the quality model returned '
                                  f'{scores.shape[0]} scores for {len(context.candidates)} crops.')
        win, lose = pick_pair(scores)
        return {'win': win, 'lose': lose, 'scores': [{'biqa': json_float(s)} for s in scores],
                'candidate_scores': [json_float(s) for s in scores]}


def load_biqa_quality(network_opt, checkpoint=None, device='cpu', param_key='params', strict=True):
    """Build a quality callable from a BasicSR network option and a checkpoint.

    Args:
        network_opt (dict | str | None): A ``network_g``-style dict (``type: RankCalibratedIQAArch, ...``),
            or the path of a YAML file holding one (at the top level or under ``network_g``), read with
            the one option reader (:func:`dspo_basicsr.utils.options.read_option_file`). None: a
            ``RankCalibratedIQAArch`` whose options are in the JSON written beside its checkpoint.
        checkpoint (str, optional): For ``RankCalibratedIQAArch``, the ``net_g_<iter>.pth`` of
            ``RankCalibrationModel`` (rectifier weights; the frozen backbone comes from its
            ``backbone.load_path``), loaded by ``load_rank_calibrated_iqa``. For any other arch, a state dict
            saved by BasicSR (``{'params': ...}``) or a plain one, read by
            :func:`dspo_basicsr.utils.checkpoint.read_checkpoint` (weights only). None keeps
            the weights the network builds with.
        device (str): Torch device.
        param_key (str): Key of the state dict inside a BasicSR checkpoint. Default: ``'params'``.
        strict (bool): ``load_state_dict`` strictness.

    Returns:
        callable: ``quality(crops (K, 3, h, w) in [0, 1]) -> (K,)`` tensor. The network's output may be
        a tensor of K scores (or (K, 1)), a tuple whose first item is that, or a dict with ``'score'``.
    """
    import copy

    import torch

    from dspo_basicsr.utils.checkpoint import read_checkpoint
    from dspo_basicsr.utils.options import read_option_file

    from basicsr.archs import build_network

    if isinstance(network_opt, (str, os.PathLike)):
        loaded = read_option_file(str(network_opt), require=())
        network_opt = loaded.get('network_g', loaded)
    if network_opt is None and checkpoint is not None:
        network_opt = {'type': 'RankCalibratedIQAArch'}  # options from the JSON beside the checkpoint
    if not isinstance(network_opt, dict) or 'type' not in network_opt:
        raise ValueError(f'The BIQA network option must be a dict with a type, got {network_opt!r}.')
    if network_opt['type'] == 'RankCalibratedIQAArch' and checkpoint is not None:
        # RankCalibrationModel saves only the rectifier; its loader rebuilds the frozen backbone
        from dspo_basicsr.archs.rank_calibrated_iqa_arch import load_rank_calibrated_iqa
        net = load_rank_calibrated_iqa(checkpoint, {k: v for k, v in network_opt.items() if k != 'type'} or None)
        checkpoint = None
    else:
        net = build_network(copy.deepcopy(dict(network_opt)))
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f'BIQA checkpoint not found: {checkpoint}; train it with the rank-calibration '
                                    'option or point --biqa-checkpoint at the saved net_g_*.pth.')
        state = read_checkpoint(checkpoint, what='BIQA checkpoint', unwrap=(param_key,))
        net.load_state_dict(state, strict=strict)
    net = net.to(device).eval()

    def quality(crops):
        with torch.no_grad():
            out = net(crops.to(device))
        if isinstance(out, dict):
            out = out['score']
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(crops.shape[0], -1)[:, 0]

    quality.network = net
    return quality
