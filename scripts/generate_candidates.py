#!/usr/bin/env python
"""Step 1 of the preference-data chain: candidate SR outputs of each LQ image, scored and selected.

    python scripts/generate_candidates.py -opt chain.yml --lq LQ_DIR [--gt GT_DIR] --work WORK

Samples the framework of the YAML (``framework.network``, any registered arch such as ControlSD2Arch) under
``sampling.default`` plus ``sampling.grid``, scores the outputs with ``metrics`` and keeps the top
``sampling.num_keep`` in WORK/candidates/<sid>/. Settings that differ only in seed are sampled as one batch of
at most ``sampling.batch_size`` (default 8). Rerunning skips finished images. An optional ``sources``
section (entries as in scripts/run_sr_methods.py's methods YAML: a BasicSR network_g with its checkpoint, or a
framework) adds one candidate per source beside the settings grid, for candidates from several models.
"""
import argparse
import json
import sys

import dspo_basicsr  # noqa: F401  (registers the archs and metrics)
from dspo_basicsr.preference.pipeline import (
    build_framework,
    discover_inputs,
    load_chain_options,
    run_candidate_step,
    run_interruptible,
    sampling_settings,
)
from dspo_basicsr.utils.distributed import add_launcher_argument, data_shard


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', '--opt', required=True, help='chain YAML (framework, sampling, metrics sections)')
    parser.add_argument('--lq', required=True, help='folder of LQ images (file stem = sample id)')
    parser.add_argument('--gt', default=None, help='folder of GT images with the same stems (optional)')
    parser.add_argument('--work', required=True, help='work folder shared by the chain steps')
    parser.add_argument('--prompts', default=None, help='JSON file {sid: prompt} (default: sampling.prompt)')
    parser.add_argument('--num-keep', type=int, default=None,
                        help='N candidates kept (default: sampling.num_keep or 4)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--overwrite', action='store_true', help='redo images already finished')
    parser.add_argument('--no-progress', action='store_true')
    add_launcher_argument(parser)
    args = parser.parse_args(argv)
    shard = data_shard(args.launcher)

    opt = load_chain_options(args.opt)
    sampling = dict(opt.get('sampling') or {})
    prompts = None
    if args.prompts:
        with open(args.prompts, encoding='utf-8') as handle:
            prompts = json.load(handle)
    framework = build_framework(opt.get('framework') or {}, device=shard.device(args.device))
    settings = sampling_settings(framework, sampling)
    if opt.get('sources'):
        from dspo_basicsr.sr_methods import MultiSourceFramework, build_method, check_method_entries
        sources = check_method_entries(opt['sources'], f'{args.opt}, sources')
        framework = MultiSourceFramework(framework, {name: build_method(name, entry, shard.device(args.device))
                                                     for name, entry in sources.items()})
        settings = settings + framework.source_settings()
    report = run_candidate_step(
        args.work, discover_inputs(args.lq, args.gt), framework, settings,
        num_keep=args.num_keep or sampling.get('num_keep', 4), metrics=opt.get('metrics'),
        prompt=sampling.get('prompt', ''), prompts=prompts, negative_prompt=sampling.get('negative_prompt'),
        overwrite=args.overwrite, progress=not args.no_progress, shard=shard,
        batch_size=int(sampling.get('batch_size', 8)))
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == '__main__':
    sys.exit(run_interruptible(main))
