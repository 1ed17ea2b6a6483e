"""The human scorer: preferences imported from an annotation file.

Human annotation JSON (``--scorer human --annotations FILE``)::

    {
      "format": "dspo-human-annotation",
      "version": 1,
      "samples": {
        "<sid>": {
          "instances": {
            "<instance id>": {"win": 2, "lose": 0, "negative": ["smeared fur", "plastic skin"],
                              "scores": [0.1, 0.4, 0.9, 0.3]}
          },
          "negative_prompt": "optional text appended to the sample's negative prompt"
        }
      }
    }

``win``/``lose`` are candidate indices ``0..N-1`` as in ``work/candidates/<sid>/c{n}.png`` (the contact
sheets of ``scripts/show_preference_set.py --work`` show them with the instance ids); an instance left
out has no pair; ``negative`` (optional) lists descriptions of the dispreferred result that become
negative-prompt feedback; ``scores`` (optional) rates every candidate, higher is better (e.g. a ranking
turned into numbers), and becomes the instance's ``candidate_scores``. A sample missing from the file is
reported as an error and not marked done.
"""
import json
import os

import numpy as np

from dspo_basicsr.preference.scorers.base import InstanceScorer, ScorerItemError, json_float

__all__ = ['HumanInstanceScorer']


class HumanInstanceScorer(InstanceScorer):
    """Preferences imported from a human annotation JSON file (format in the module docstring).

    Args:
        annotations (str | dict): Path of the JSON file, or its parsed content.
    """

    name = 'human'
    uses_top_k = False

    def __init__(self, annotations):
        self.path = annotations if isinstance(annotations, (str, os.PathLike)) else '<annotations>'
        if isinstance(annotations, (str, os.PathLike)):
            try:
                with open(annotations, encoding='utf-8') as handle:
                    annotations = json.load(handle)
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f'Cannot read the human annotation file {self.path}: {err}') from err
        if not isinstance(annotations, dict) or annotations.get('format') != 'dspo-human-annotation' \
                or not isinstance(annotations.get('samples'), dict):
            raise ValueError(f'{self.path} is not a human annotation file: it needs "format": '
                             '"dspo-human-annotation" and a "samples" object (see dspo_basicsr.preference.'
                             'scorers.human).')
        self.samples = annotations['samples']

    def _sample(self, context):
        if context.sid not in self.samples:
            raise ScorerItemError(f'Sample {context.sid!r} has no annotation in {self.path}.')
        return self.samples[context.sid]

    def annotated_instances(self, context):
        """Instance ids annotated for this sample, validated against the label map."""
        entry = self._sample(context)
        present = set(np.unique(context.seg).tolist())
        ids = []
        for key in entry.get('instances', {}):
            try:
                instance_id = int(key)
            except ValueError as err:
                raise ScorerItemError(f'{self.path}: sample {context.sid!r}, instance key {key!r} is not an '
                                      'integer id.') from err
            if instance_id not in present:
                raise ScorerItemError(f'{self.path}: sample {context.sid!r}, instance {instance_id} is not in its '
                                      f'label map (ids 0..{max(present)}).')
            ids.append(instance_id)
        return ids

    def score_instance(self, context, instance_id):
        record = self._sample(context).get('instances', {}).get(str(instance_id))
        if record is None:
            return {'win': -1, 'lose': -1}
        n = len(context.candidates)
        for key in ('win', 'lose'):
            value = record.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
                raise ScorerItemError(f'{self.path}: sample {context.sid!r}, instance {instance_id}, key {key!r} = '
                                      f'{value!r} is not a candidate index 0..{n - 1}.')
        if record['win'] == record['lose']:
            raise ScorerItemError(f'{self.path}: sample {context.sid!r}, instance {instance_id}: win and lose are '
                                  f'the same candidate ({record["win"]}).')
        result = {'win': record['win'], 'lose': record['lose']}
        scores = record.get('scores')
        if scores is not None:
            if not isinstance(scores, list) or len(scores) != n or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
                raise ScorerItemError(f'{self.path}: sample {context.sid!r}, instance {instance_id}: scores must list '
                                      f'one number per candidate ({n}), higher is better; got {scores!r:.100}.')
            result['candidate_scores'] = [json_float(v) for v in scores]
        negative = record.get('negative')
        if negative:
            negative = [negative] if isinstance(negative, str) else [str(t) for t in negative]
            result['feedback'] = {'negative': negative, 'source': 'human'}
        return result

    def sample_extras(self, context):
        text = self._sample(context).get('negative_prompt')
        return {'negative_prompt': str(text)} if text else {}
