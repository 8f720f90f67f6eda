"""Summarize a sweep: `python scripts/summarize.py outputs/multiruns/<date>_<time>` writes summary.csv (each run's
name, how it ended, final and best val/loss, tokens seen, wall time), summary_groups.csv (each group of runs that
differ only in their seed: mean final val/loss, sd, n, 95% CI; Δ against the first group with its 95% CI, Welch's p
and the verdict at --alpha), summary.md (both tables) and val_loss.png (each group's val/loss curve, 95% CI error
bars) into the sweep dir. A multirun does this itself when it ends (conf/hydra/default.yaml).

`python scripts/summarize.py --unused-tokens <run dir> [--up-to-step N]` instead plots a run's val/loss split
at never-seen tokens (experiment=unused_tokens) into <run dir>/unused_tokens.png and prints the finding.

`--ablation ablation [--baseline baseline]` also writes ablation.md, ablation.csv and ablation.png
(experiment=design_ablations): each option of the config group against the baseline, at the default lr and, when the
sweep varies train.lr_scale (or --best-lr-from <lr sweep dir>), at each option's best lr.

`--lr-sweep [KEY]` also writes lr_sensitivity.md, .csv and .png (experiment=lr_sensitivity): per group of runs its
best value of the lr axis KEY (train.lr_scale), the final val/loss there ± 95% CI, and its LR sensitivity.

`--instabilities` also writes instabilities.md, instabilities.csv and instabilities.png (experiment=instabilities):
per learning rate, qk_norm and z_loss, each seed's largest attention logit, final log Z and val/loss, and whether it
diverged.

`--mu-transfer` also writes mu_transfer.md, .csv and .png (experiment=mu_transfer): per parametrization and width the
best optim.lr, and how many grid steps it moves across the widths."""

import argparse
import logging
from pathlib import Path

from gpt2lab.ablation import ABLATION_FILES, ablation_table
from gpt2lab.errors import exit_on_user_error
from gpt2lab.lr_sweep import LR_FILES, LR_KEY, lr_sweep_table
from gpt2lab.metrics import unused_token_report
from gpt2lab.mutransfer import TRANSFER_FILES, transfer_table
from gpt2lab.stability import INSTABILITY_FILES, instability_table
from gpt2lab.stats import ALPHA
from gpt2lab.sweep import SUMMARY_FILES, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="a multirun's hydra.sweep.dir, e.g. outputs/multiruns/<date>_<time>")
    parser.add_argument("--unused-tokens", action="store_true", help="dir is one run: report its val/loss split")
    parser.add_argument("--up-to-step", type=int, help="with --unused-tokens: the last step to count")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="the significance level of the verdicts: p < alpha")
    parser.add_argument("--reference", help="the group the others are compared with (default: the first run's)")
    parser.add_argument("--ablation", metavar="GROUP", help="compare the options of this config group (e.g. ablation)")
    parser.add_argument("--baseline", default="baseline", help="with --ablation: the option to compare against")
    parser.add_argument("--best-lr-from", type=Path, metavar="DIR", help="with --ablation: an lr sweep of its options")
    parser.add_argument("--lr-sweep", nargs="?", const=LR_KEY, metavar="KEY", help=f"the lr axis (default {LR_KEY})")
    parser.add_argument("--instabilities", action="store_true", help="dir is experiment=instabilities' sweep")
    parser.add_argument("--mu-transfer", action="store_true", help="dir is experiment=mu_transfer's sweep")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error():
        if args.unused_tokens:
            print(unused_token_report(args.dir, args.up_to_step))
            return
        summarize(args.dir, args.alpha, args.reference)
        if args.lr_sweep:
            lr_sweep_table(args.dir, args.lr_sweep)
        if args.ablation:
            ablation_table(args.dir, args.ablation, args.baseline, args.alpha, args.best_lr_from)
        if args.instabilities:
            instability_table(args.dir)
        if args.mu_transfer:
            transfer_table(args.dir)
    print((args.dir / SUMMARY_FILES[1]).read_text(), end="")
    tables = (
        (args.lr_sweep, LR_FILES),
        (args.ablation, ABLATION_FILES),
        (args.instabilities, INSTABILITY_FILES),
        (args.mu_transfer, TRANSFER_FILES),
    )
    for wrote, files in tables:
        if wrote:
            print("\n" + (args.dir / files[0]).read_text(), end="")


if __name__ == "__main__":
    main()
