#!/usr/bin/env python
"""Step 2 of the preference-data chain: one partition label map of semantic instances per LQ image.

    python scripts/segment_instances.py -opt chain.yml --work WORK

Runs the ``segmenter`` of the YAML (``type: SAM`` with a local ``checkpoint`` and ``model_type``
vit_b/l/h, or ``type: SLIC``) on the GT when present, else on the default candidate, and writes
WORK/seg/<sid>.png (uint16). ``segmentation.min_area`` / ``uncovered`` / ``source`` set the conversion.
Rerunning skips finished images.
"""
import argparse
import sys

import dspo_basicsr  # noqa: F401
from dspo_basicsr.preference.pipeline import load_chain_options, run_interruptible, run_segment_step
from dspo_basicsr.preference.segmentation import build_segmenter
from dspo_basicsr.utils.distributed import add_launcher_argument, data_shard


def _on_local_gpu(section, shard):
    """``device: cuda`` of a section -> this rank's GPU (``cuda:LOCAL_RANK``)."""
    section = dict(section)
    if 'device' in section:
        section['device'] = shard.device(section['device'])
    return section


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', '--opt', required=True, help='chain YAML (segmenter, segmentation sections)')
    parser.add_argument('--work', required=True, help='work folder of generate_candidates.py')
    parser.add_argument('--min-area', type=int, default=None, help='merge smaller instances (SR pixels)')
    parser.add_argument('--uncovered', choices=('background', 'neighbours'), default=None)
    parser.add_argument('--source', choices=('auto', 'gt', 'default'), default=None,
                        help='image to segment: GT when present (auto), GT, or the default candidate')
    parser.add_argument('--overwrite', action='store_true')
    parser.add_argument('--no-progress', action='store_true')
    add_launcher_argument(parser)
    args = parser.parse_args(argv)
    shard = data_shard(args.launcher)

    opt = load_chain_options(args.opt)
    section = dict(opt.get('segmentation') or {})
    report = run_segment_step(
        args.work, build_segmenter(_on_local_gpu(opt.get('segmenter') or {'type': 'SLIC'}, shard)),
        min_area=args.min_area if args.min_area is not None else section.get('min_area', 0),
        uncovered=args.uncovered or section.get('uncovered', 'background'),
        source=args.source or section.get('source', 'auto'), overwrite=args.overwrite,
        progress=not args.no_progress, shard=shard)
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == '__main__':
    sys.exit(run_interruptible(main))
