"""Samples/s of PreferenceLMDBDataset against the same samples stored as PNG folders, side by side.

All datasets share the crop, augmentation, decoding and checks (PreferenceLMDBDataset's code); they
differ only in storage. Two PNG-folder baselines: ``png-cv2`` holds PNGs written with OpenCV's defaults
(as ``cv2.imwrite`` and the preference-data pipeline's work folders write them), ``png-same`` the very
PNG bytes of the LMDB set (so LMDB / png-same isolates the container). Example::

    python scripts/bench_lmdb.py --num-samples 64 --num-candidates 4 --sr-size 256 --scale 4
"""
import argparse
import os
import tempfile

from dspo_basicsr.bench.png_folder import (
    PreferenceLMDBDataset,
    PreferencePNGFolderDataset,
    folder_megabytes,
    measure_samples_per_second,
    synthetic_samples,
    write_preference_png_folders,
)
from dspo_basicsr.preference import write_preference_lmdb


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--num-samples', type=int, default=64)
    parser.add_argument('--num-candidates', type=int, default=4)
    parser.add_argument('--sr-size', type=int, default=256, help='candidate height and width')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--gt-size', type=int, default=128, help='training crop on the SR grid (0: whole image)')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--epochs', type=int, default=5, help='timed passes per measurement')
    parser.add_argument('--repeats', type=int, default=3, help='measurements per setting; the best is kept')
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    parser.add_argument('--png-compression', type=int, default=0, help='png_compression of the LMDB set (0-9)')
    parser.add_argument('--workdir', default=None, help='where to write the sets (default: a temp folder)')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        def samples():
            return synthetic_samples(args.num_samples, args.num_candidates, args.sr_size, args.scale)

        paths = {name: os.path.join(workdir, name) for name in ('lmdb', 'png-same', 'png-cv2')}
        write_preference_lmdb(paths['lmdb'], samples(), scale=args.scale, total=args.num_samples,
                              png_compression=args.png_compression)
        write_preference_png_folders(paths['png-same'], samples(), args.scale, png_compression=args.png_compression)
        write_preference_png_folders(paths['png-cv2'], samples(), args.scale, png_compression=None)
        opt = {'phase': 'train', 'gt_size': args.gt_size or None, 'use_hflip': True, 'use_rot': True}
        datasets = {'lmdb': PreferenceLMDBDataset(dict(opt, dataroot=paths['lmdb']))}
        datasets.update({name: PreferencePNGFolderDataset(dict(opt, dataroot=paths[name]))
                         for name in ('png-same', 'png-cv2')})

        print(f'{args.num_samples} samples, {args.num_candidates} candidates, {args.sr_size}x{args.sr_size} SR, '
              f'x{args.scale}, crop {args.gt_size or "none"}, batch {args.batch_size}, LMDB png_compression '
              f'{args.png_compression}, best of {args.repeats} runs of {args.epochs} epochs')
        print('size on disk (MB): ' + ', '.join(f'{name} {folder_megabytes(path):.1f}' for name, path in paths.items()))
        names = list(datasets)
        print(f"{'':<18}" + f"{'samples/s':^{9 * len(names)}}" + ' | ' + f"{'LMDB / PNG folders':^27}")
        print(f"{'workers  rate':<18}" + ''.join(f'{n:>9}' for n in names) + ' | '
              + ' '.join(f'{"lmdb/" + n:>13}' for n in names[1:]))
        for workers in args.workers:
            best = {(name, kind): 0.0 for name in names for kind in ('wall', 'cpu')}
            for _ in range(args.repeats):
                for name, dataset in datasets.items():  # interleaved, so load changes hit all alike
                    rates = measure_samples_per_second(dataset, workers, args.batch_size, args.epochs)
                    for kind, rate in zip(('wall', 'cpu'), rates, strict=True):
                        best[name, kind] = max(best[name, kind], rate)
            for kind, label in (('wall', 'per wall s'), ('cpu', 'per CPU s')):
                print(f'{workers:>7}  {label:<9}' + ''.join(f'{best[n, kind]:>9.1f}' for n in names) + ' | '
                      + ' '.join(f"{best['lmdb', kind] / best[n, kind]:>12.2f}x" for n in names[1:]))


if __name__ == '__main__':
    main()
