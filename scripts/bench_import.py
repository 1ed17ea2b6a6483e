"""Start-up cost: CPU and wall seconds of fresh interpreters, side by side, and what the plugin adds to basicsr.

    python scripts/bench_import.py [--repeats 5] [--top 15] [--no-bytecode-cache]

Starts, each a new process, alternating: ``pass``, ``import torch``, ``import torchvision``, ``import basicsr``
(with the functional_tensor alias basicsr 1.4.2 needs, :data:`dspo_basicsr.bench.startup.COMPAT_SHIM`),
``import dspo_basicsr`` and ``basicsr --help`` (the console script's ``dspo_basicsr.cli:main``). Prints the median
CPU (user + sys) and wall seconds of each, the plugin's own share (``import dspo_basicsr`` minus the basicsr
floor), and, from ``python -X importtime``, the modules ``import dspo_basicsr`` loads that ``import basicsr`` does
not, by their own import time. CPU seconds are the figure to compare on a shared machine.

The children write compiled bytecode to a temporary folder (``PYTHONPYCACHEPREFIX``) in the untimed first round,
so the timed starts are a user's second start; ``--no-bytecode-cache`` keeps this environment's setting (with
``PYTHONDONTWRITEBYTECODE=1`` and no ``__pycache__`` in the checkout every start compiles the plugin's sources).
"""
import argparse
import os
import sys
import tempfile

from dspo_basicsr.bench.startup import STARTS, modules_added, repository_env, time_starts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR, PLUGIN = 'import basicsr (+ compat shim)', 'import dspo_basicsr'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=5, help='timed rounds (each starts every kind once)')
    parser.add_argument('--top', type=int, default=15, help='modules the plugin adds to list (0: none)')
    parser.add_argument('--no-bytecode-cache', action='store_true',
                        help="keep this environment's bytecode setting (default: a temporary cache folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='bench_import_pycache_') as cache:
        report(args, repository_env(REPO, None if args.no_bytecode_cache else cache))
    return 0


def report(args, env):
    """Time the starts in ``env`` and print the table, the plugin's share and the modules it adds."""
    timings = time_starts(STARTS, args.repeats, env=env, cwd=REPO)
    print(f'{args.repeats} rounds, medians       CPU s   wall s   CPU vs basicsr floor')
    floor = timings[FLOOR].cpu_median
    for name, timing in timings.items():
        print(f'  {name:<26} {timing.cpu_median:6.2f}   {timing.wall_median:6.2f}   '
              f'{timing.cpu_median / floor:5.2f}x')
    own = timings[PLUGIN].cpu_median - floor
    print(f'the plugin\'s own share (import dspo_basicsr - basicsr floor): {own:+.2f} s CPU '
          f'({own / timings[PLUGIN].cpu_median:.0%} of import dspo_basicsr)')
    if args.top:
        added = modules_added(STARTS[PLUGIN][0], STARTS[FLOOR][0], env=env, cwd=REPO)
        ours = sum(s for module, s in added if module.split('.')[0] == 'dspo_basicsr')
        print(f'modules import dspo_basicsr loads beyond the floor: {len(added)}, {sum(s for _, s in added):.2f} s '
              f'self time (-X importtime, one run), of which dspo_basicsr.* {ours:.2f} s; the largest:')
        for module, seconds in added[:args.top]:
            print(f'  {seconds:6.3f} s  {module}')


if __name__ == '__main__':
    sys.exit(main())
