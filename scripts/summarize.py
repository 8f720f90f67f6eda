"""Summarize a sweep: `python scripts/summarize.py outputs/multiruns/<date>_<time>` writes summary.csv,
summary.md (each run's name, how it ended, final and best val/loss, tokens seen, wall time) and val_loss.png
(every run's val/loss curve) into the sweep dir. A multirun does this itself when it ends (conf/hydra/default.yaml).

`python scripts/summarize.py --unused-tokens <run dir> [--up-to-step N]` instead plots a run's val/loss split
at never-seen tokens (experiment=unused_tokens) into <run dir>/unused_tokens.png and prints the finding.

`python scripts/summarize.py <sweep dir> --ablation ablation [--baseline baseline]` also writes ablation.md,
ablation.csv and ablation.png (experiment=design_ablations): each option of the config group against the
baseline, its Δ final val/loss, the seeds' spread, and whether the difference exceeds it."""

import argparse
import logging
from pathlib import Path

from gpt2lab.ablation import ABLATION_FILES, ablation_table
from gpt2lab.errors import exit_on_user_error
from gpt2lab.metrics import unused_token_report
from gpt2lab.sweep import SUMMARY_FILES, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="a multirun's hydra.sweep.dir, e.g. outputs/multiruns/<date>_<time>")
    parser.add_argument("--unused-tokens", action="store_true", help="dir is one run: report its val/loss split")
    parser.add_argument("--up-to-step", type=int, help="with --unused-tokens: the last step to count")
    parser.add_argument("--ablation", metavar="GROUP", help="compare the options of this config group (e.g. ablation)")
    parser.add_argument("--baseline", default="baseline", help="with --ablation: the option to compare against")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error():
        if args.unused_tokens:
            print(unused_token_report(args.dir, args.up_to_step))
            return
        summarize(args.dir)
        if args.ablation:
            ablation_table(args.dir, args.ablation, args.baseline)
    print((args.dir / SUMMARY_FILES[1]).read_text(), end="")
    if args.ablation:
        print((args.dir / ABLATION_FILES[0]).read_text(), end="")


if __name__ == "__main__":
    main()
