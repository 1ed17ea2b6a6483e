#!/usr/bin/env python
"""Step 4 of the preference-data chain: the finished items of a work folder as a preference LMDB set.

    python scripts/build_preference_set.py --work WORK --out datasets/mine.lmdb [--sheets DIR]

The build is atomic (temporary folder renamed at the end) and resumes an interrupted build of the same
``--out``. ``--sheets`` also writes a contact sheet per sample.
"""
import argparse
import sys

import dspo_basicsr  # noqa: F401
from dspo_basicsr.data.preference_set import PreferenceLMDB
from dspo_basicsr.preference.contact_sheet import write_contact_sheets
from dspo_basicsr.preference.pipeline import assemble_preference_set, run_interruptible


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work', required=True, help='work folder of the previous steps')
    parser.add_argument('--out', required=True, help='preference set to write, NAME.lmdb')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing set once the new one is built')
    parser.add_argument('--no-resume', action='store_true', help='discard an interrupted build of --out')
    parser.add_argument('--sheets', default=None, help='also write contact sheets into this folder')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)

    try:
        _, report = assemble_preference_set(args.work, args.out, overwrite=args.overwrite,
                                            resume=not args.no_resume, progress=not args.no_progress)
    except FileExistsError:
        print(f"preference set '{args.out}' already exists; pass --overwrite to replace it (the old set is kept "
              'until the new one is complete).', file=sys.stderr)
        return 2
    print(report.summary().replace('failed', 'left out (unfinished)'))
    if args.sheets:
        preference_set = PreferenceLMDB(args.out)
        write_contact_sheets((preference_set[sid] for sid in preference_set.ids()), args.sheets,
                             progress=not args.no_progress)
    print(f'preference set: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(run_interruptible(main))
