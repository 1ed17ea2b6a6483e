#!/usr/bin/env python
"""Step 3 of the preference-data chain: preferred / dispreferred candidate of the K largest instances.

    python scripts/score_instances.py -opt chain.yml --work WORK [--scorer metric|biqa|vlm|human]

The ``scorer`` section of the YAML chooses the scorer (``--scorer`` overrides the type, reading its options
from a ``scorer_<type>`` section when the main one is of another type); ``scoring.top_k`` (default 5) how
many instances get a pair; an optional ``feedback`` section adds VLM description feedback (negative prompt).
Writes WORK/instances/<sid>.json. Rerunning skips finished images; a VLM's replies are cached.
"""
import argparse
import sys

import dspo_basicsr  # noqa: F401
from dspo_basicsr.preference.pipeline import (
    feedback_from_options,
    load_chain_options,
    run_interruptible,
    run_scoring_step,
    scorer_from_options,
)
from dspo_basicsr.utils.distributed import add_launcher_argument, data_shard


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', '--opt', required=True, help='chain YAML (scorer, scoring, feedback sections)')
    parser.add_argument('--work', required=True, help='work folder of the previous steps')
    parser.add_argument('--scorer', choices=('metric', 'biqa', 'vlm', 'human'), default=None)
    parser.add_argument('--annotations', default=None, help='human annotation JSON (with --scorer human)')
    parser.add_argument('--top-k', type=int, default=None, help='instances per image with a pair (default 5)')
    parser.add_argument('--overwrite', action='store_true')
    parser.add_argument('--no-progress', action='store_true')
    add_launcher_argument(parser)
    args = parser.parse_args(argv)
    shard = data_shard(args.launcher)

    opt = load_chain_options(args.opt)
    for key, section in opt.items():  # a scorer's ``device: cuda`` -> this rank's GPU
        if (key == 'scorer' or key.startswith('scorer_')) and isinstance(section, dict) and 'device' in section:
            opt[key] = dict(section, device=shard.device(section['device']))
    top_k = args.top_k if args.top_k is not None else (opt.get('scoring') or {}).get('top_k', 5)
    report = run_scoring_step(args.work, scorer_from_options(opt, args.scorer, args.annotations), top_k=top_k,
                              feedback=feedback_from_options(opt), overwrite=args.overwrite,
                              progress=not args.no_progress, shard=shard)
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == '__main__':
    sys.exit(run_interruptible(main))
