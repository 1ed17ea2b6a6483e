"""The ``basicsr`` command: our train and test pipelines (:mod:`dspo_basicsr.train`, :mod:`dspo_basicsr.test`).

Usage::

    basicsr train -opt options/dspo_seesr.yml [--launcher none|pytorch|slurm] [--auto_resume] [--debug]
                  [--force_yml train:ema_decay=0.999 ...]
    basicsr test -opt options/test_dspo_seesr.yml
    torchrun --nproc_per_node=8 -m dspo_basicsr.cli train -opt options/dspo_seesr.yml --launcher pytorch

Experiments, results and tb_logger are written under the current directory, as with BasicSR.
"""
import argparse
import os
import re
import sys

import yaml

from dspo_basicsr.utils.options import OptionFileError, read_option_file, yaml_literal  # noqa: F401  (re-exported)

USAGE = __doc__.split('Usage::', 1)[1].split('Experiments', 1)[0].rstrip()
_FORCE_YML_ENTRY = re.compile(r'^[\w.\-]+(:[\w.\-]+)*=[^\n=]*$')


def apply_force_yml(opt, entries):
    """Apply ``--force_yml section:key=value`` entries to ``opt``; values are YAML literals, never evaluated.

    Raises:
        OptionFileError: A malformed entry, a section that does not exist, or a value that is not YAML.
    """
    for entry in entries or ():
        if not _FORCE_YML_ENTRY.match(entry):
            raise OptionFileError(f'--force_yml entries must look like section:key=value (one =); refused: {entry!r}')
        keys, value = entry.split('=', 1)
        parts = keys.strip().split(':')
        node = opt
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise OptionFileError(f"--force_yml {entry!r}: there is no section '{':'.join(parts[:depth + 1])}' "
                                      'in the option file.')
            node = node[part]
        try:
            node[parts[-1]] = yaml_literal(value.strip())
        except yaml.YAMLError as err:
            raise OptionFileError(f'--force_yml {entry!r}: the value is not a YAML literal ({err}).') from None
    return opt


def _build_parser():
    parser = argparse.ArgumentParser(
        prog='basicsr', description='BasicSR train/test pipelines with the dspo_basicsr plugin registered.',
        usage=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', metavar='{train,test}')
    for name, what in (('train', 'train a model'), ('test', 'test a trained model')):
        cmd = sub.add_parser(name, prog=f'basicsr {name}', help=what,
                             description=f'{what.capitalize()} from a BasicSR option file.')
        cmd.add_argument('-opt', required=True, metavar='FILE', help='path to the option YAML file')
        cmd.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                         help='job launcher: none (one process), pytorch (torchrun), slurm (srun)')
        cmd.add_argument('--auto_resume', action='store_true',
                         help='resume from the latest state in experiments/<name>/training_states')
        cmd.add_argument('--debug', action='store_true', help='debug mode (name prefixed with debug_)')
        cmd.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
        cmd.add_argument('--force_yml', nargs='+', default=None, metavar='KEY=VALUE',
                         help='override options, e.g. train:ema_decay=0.999 (existing keys only)')
    return parser


def _basicsr_argv(args):
    argv = ['basicsr', '-opt', args.opt, '--launcher', args.launcher]
    if args.auto_resume:
        argv.append('--auto_resume')
    if args.debug:
        argv.append('--debug')
    if args.local_rank is not None:
        os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
        argv += ['--local_rank', str(args.local_rank)]
    if args.force_yml:
        argv += ['--force_yml', *args.force_yml]
    return argv


def main(argv=None):
    """Entry point of the ``basicsr`` console script. Returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    from dspo_basicsr.option_check import OptionCheckError, check_options
    try:
        opt = apply_force_yml(read_option_file(args.opt), args.force_yml)
        basicsr_argv = _basicsr_argv(args)
        # Before BasicSR makes (and archives) any experiment folder: a refused run leaves the last one intact.
        warnings = check_options(opt, is_train=args.command == 'train')
    except OptionFileError as err:
        print(f'basicsr {args.command}: error: {err}', file=sys.stderr)
        return 2
    except OptionCheckError as err:
        print(f'basicsr {args.command}: error: {args.opt}: {err}', file=sys.stderr)
        return 2
    for warning in warnings:
        print(f'basicsr {args.command}: warning: {args.opt}: {warning} (BasicSR class; not checked further)',
              file=sys.stderr)

    import dspo_basicsr  # noqa: F401  (the import shims, then the registries filled)
    from dspo_basicsr.metrics.metric_table import MissingWeightsError
    from dspo_basicsr.train import AllUpdatesSkippedError, ExperimentLockedError
    from dspo_basicsr.utils.resume import ResumeStateError
    root_path = os.getcwd()
    try:
        if args.command == 'train':
            from dspo_basicsr.train import train_pipeline
            sys.argv = basicsr_argv  # copy_opt_file writes the command into the copied option file
            return train_pipeline(root_path, opt, args)
        from dspo_basicsr.test import test_pipeline
        return test_pipeline(root_path, opt, args)
    except (MissingWeightsError, ResumeStateError, ExperimentLockedError) as err:  # before any iteration
        print(f'basicsr {args.command}: error: {err}', file=sys.stderr)
        return 2
    except AllUpdatesSkippedError as err:
        print(f'basicsr {args.command}: error: {err}', file=sys.stderr)
        return 1

if __name__ == '__main__':
    sys.exit(main())
