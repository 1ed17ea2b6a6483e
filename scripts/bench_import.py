"""Start-up cost of ``import dspo_basicsr`` (fresh interpreters), against the same import plus what it used to load.

Importing the package fills BasicSR's registries; diffusers and transformers are imported only when a diffusion
network is built. ``eager`` imports the package and then the diffusers / transformers classes the arch files used
to import at the top (what every process paid before, e.g. ``basicsr --help`` or a BasicSR-only training run).
Both run alternately in fresh interpreters, so they see the same machine load. Example::

    python scripts/bench_import.py --repeats 5
"""
import argparse
import os
import subprocess
import sys

from dspo_basicsr.bench.timer import timed_side_by_side

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = 'import dspo_basicsr'
EAGER = ('import dspo_basicsr; from diffusers import ControlNetModel, UNet2DConditionModel, AutoencoderKL; '
         'from transformers import CLIPTextModel, CLIPTokenizer')


def fresh_interpreter(code):
    """A call running ``code`` in a new Python process (this repository first on the path)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))

    def run():
        subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, check=True, capture_output=True)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=5, help='timed interpreter starts of each kind')
    args = parser.parse_args()
    lazy, eager = timed_side_by_side(fresh_interpreter(LAZY), fresh_interpreter(EAGER), args.repeats)
    print(f'import dspo_basicsr:                          median {lazy.median:.2f} s, min {lazy.min:.2f} s')
    print(f'  + diffusers / transformers (the old eager set): median {eager.median:.2f} s, min {eager.min:.2f} s')
    print(f'ratio eager / lazy: {eager.median / lazy.median:.2f}x (median), {eager.min / lazy.min:.2f}x (min)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
