#!/usr/bin/env python
"""Plan the GPU memory and FLOPs of one real-size DSPO training step without a GPU (``meta`` tensors).

    python scripts/plan_gpu.py -opt options/dspo_seesr.yml                      # 512 px, 4 candidates, batch 1
    python scripts/plan_gpu.py -opt options/dspo_seesr.yml --set train.feedback_guidance_scale=null \\
        --set network_g.gradient_checkpointing=true                                # M1, checkpointing on
    python scripts/plan_gpu.py --matrix docs_matrix.md                             # the table of docs/frameworks.md

Prints a table (peak memory by parameters / gradients / optimizer state / activations, FLOPs by policy
forward / reference forward / backward / VAE, a step-time floor per GPU) and writes it as JSON with ``--json``.
``--set dotted.key=value`` overrides any option (as ``--force_yml``), so every lever that is an option is
plannable. See ``dspo_basicsr/bench/gpu_plan.py`` for what is measured and its limits.
"""
import argparse
import json
import sys

from dspo_basicsr.bench.gpu_plan import apply_overrides, format_plan, matrix_markdown, plan_matrix, plan_step
from dspo_basicsr.utils.options import read_option_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', help='training option file (network_g, train, val.sample)')
    parser.add_argument('--size', type=int, default=512, help='candidate (SR) size in pixels')
    parser.add_argument('--candidates', type=int, default=4, help='candidates per LQ image')
    parser.add_argument('--batch', type=int, default=1, help='LQ images per step')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='option override, e.g. network_g.trainable=unet_lora (repeatable)')
    parser.add_argument('--no-validation', action='store_true', help='skip the validation sample')
    parser.add_argument('--cached-latents', action='store_true',
                        help="the set stores the candidates' VAE posteriors (scripts/add_candidate_latents.py)")
    parser.add_argument('--json', help='also write the plan as JSON to this file')
    parser.add_argument('--matrix', metavar='FILE', help='plan the docs matrix and write its markdown table to FILE')
    args = parser.parse_args(argv)
    if args.matrix:
        rows = plan_matrix(read_option_file, size=args.size, overrides=args.set)
        table = matrix_markdown(rows)
        with open(args.matrix, 'w', encoding='utf-8') as f:
            f.write(table + '\n')
        print(table)
        if args.json:
            with open(args.json, 'w', encoding='utf-8') as f:
                json.dump([dict(framework=label, case=case, plan=plan) for label, case, plan in rows], f, indent=1)
        return 0
    if not args.opt:
        parser.error('give -opt FILE (or --matrix FILE)')
    opt = apply_overrides(read_option_file(args.opt), args.set)
    plan = plan_step(opt, size=args.size, candidates=args.candidates, batch=args.batch,
                     validation=not args.no_validation, cached_latents=args.cached_latents)
    print(format_plan(plan))
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(plan, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
