"""SR outputs of several methods (any BasicSR arch, or our diffusion frameworks) on the same LR images.

    python scripts/run_sr_methods.py -opt methods.yml --lr LR_DIR --out OUT_DIR [--methods A B] [--device cuda]
                                     [--overwrite] [--launcher none|pytorch|slurm]
    torchrun --nproc_per_node=G scripts/run_sr_methods.py ... --device cuda --launcher pytorch   # G GPUs

Writes OUT_DIR/<method>/<image>.png, the layout of SRMethodGroupDataset and scripts/mad_select.py. Rerunning
the same command resumes: outputs already there are skipped. methods.yml (see options/sr_methods/example.yml):

    methods:
      Real-ESRGAN:
        network_g: {type: RRDBNet, num_in_ch: 3, num_out_ch: 3, num_feat: 64, num_block: 23, num_grow_ch: 32, scale: 4}
        path: pretrained/RealESRGAN_x4plus.pth
        param_key: params_ema
        tile: 256        # LR pixels per tile (0: whole image)
      SeeSR-DSPO:
        framework: {network: {type: SeeSRArch, ...}, pretrain_network: experiments/.../net_g_latest.pth}
        sampling: {steps: 50, guidance_scale: 5.5, seed: 0, prompt: ''}
"""
import argparse
import sys

import dspo_basicsr  # noqa: F401  (registers our archs; BasicSR's are registered by basicsr itself)
from dspo_basicsr.sr_methods import run_sr_methods
from dspo_basicsr.utils.distributed import add_launcher_argument, data_shard


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', '--opt', required=True, help='methods YAML')
    parser.add_argument('--lr', required=True, help='folder of LR images')
    parser.add_argument('--out', required=True, help='output root: OUT/<method>/<image>.png')
    parser.add_argument('--methods', nargs='+', default=None, help='run only these methods of the YAML')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--overwrite', action='store_true', help='redo outputs that exist')
    parser.add_argument('--no-progress', action='store_true')
    add_launcher_argument(parser)
    args = parser.parse_args(argv)
    try:
        report = run_sr_methods(args.opt, args.lr, args.out, device=args.device, only=args.methods,
                                overwrite=args.overwrite, progress=not args.no_progress,
                                shard=data_shard(args.launcher))
    except KeyboardInterrupt:
        print(f'interrupted; the outputs written so far are kept under {args.out}. Run the same command again to '
              'resume.', file=sys.stderr)
        return 130
    except (FileNotFoundError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f'run_sr_methods.py: {message}', file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == '__main__':
    sys.exit(main())
