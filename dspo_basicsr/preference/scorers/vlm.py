"""The VLM scorer: a vision-language model behind an OpenAI-compatible API picks the best and worst crop."""
import numpy as np

from dspo_basicsr.preference.scorers.base import InstanceScorer, ScorerItemError, instance_box, json_float

__all__ = ['VLMInstanceScorer']


class VLMInstanceScorer(InstanceScorer):
    """A vision-language model picks the best and worst candidate crop of each instance.

    Args:
        client (VLMClient): :class:`dspo_basicsr.preference.vlm_client.VLMClient` (or anything with
            ``compare(lq_crop, candidate_crops, context='') -> {'best', 'worst', ...}``).
        min_crop (int): Bounding boxes grow to at least this size (SR pixels). Default: 64.
    """

    name = 'vlm'

    def __init__(self, client, min_crop=64):
        self.client = client
        self.min_crop = int(min_crop)

    @property
    def max_concurrency(self):
        """Items the scoring step scores at once: the client's ``max_concurrency`` (1 without one)."""
        return int(getattr(self.client, 'max_concurrency', 1))

    def score_instance(self, context, instance_id):
        from dspo_basicsr.preference.vlm_client import VLMError

        y0, y1, x0, x1 = instance_box(context.seg == instance_id, self.min_crop)
        scale = context.scale
        ly0, ly1 = int(y0 / scale), max(int(np.ceil(y1 / scale)), int(y0 / scale) + 1)
        lx0, lx1 = int(x0 / scale), max(int(np.ceil(x1 / scale)), int(x0 / scale) + 1)
        lq_crop = context.lq[ly0:ly1, lx0:lx1]
        crops = [c[y0:y1, x0:x1] for c in context.candidates]
        try:
            reply = self.client.compare(lq_crop, crops, context=context.prompt)
        except VLMError as err:
            raise ScorerItemError(f'Sample {context.sid!r}, instance {instance_id}: {err}') from err
        result = {'win': int(reply['best']), 'lose': int(reply['worst']),
                  'scores': {'vlm_reason': reply.get('reason', '')}}
        ratings = reply.get('scores')  # a client that also rates every crop
        if isinstance(ratings, (list, tuple)) and len(ratings) == len(crops):
            result['candidate_scores'] = [json_float(v) for v in ratings]
        return result
