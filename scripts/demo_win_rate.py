"""Instance win rate of the trained demo model over its pretrained base on the held-out crops.

    python scripts/demo_win_rate.py [-opt options/demo/dspo_demo.yml] [--checkpoint CHECKPOINT]

CHECKPOINT defaults to experiments/<name>/models/net_g_latest.pth.

Both models sample the held-out LQ crops with the option file's ``val.sample`` settings; each SLIC
instance of the GT is won by the model whose PSNR inside it is higher (the rule that labelled the set).
"""
import argparse
import json

from dspo_basicsr.demo.dspo import held_out_win_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', default='options/demo/dspo_demo.yml', help='the demo training option file')
    parser.add_argument('--checkpoint', default=None, help='default: experiments/<name>/models/net_g_latest.pth')
    args = parser.parse_args()
    import dspo_basicsr  # noqa: F401  (registers the frameworks)
    from dspo_basicsr.cli import read_option_file
    checkpoint = args.checkpoint or f"experiments/{read_option_file(args.opt)['name']}/models/net_g_latest.pth"
    print(json.dumps(held_out_win_rate(args.opt, checkpoint), indent=2))


if __name__ == '__main__':
    main()
