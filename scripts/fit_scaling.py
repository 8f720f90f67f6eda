"""Fit a scaling law to a sweep over model size: `python scripts/fit_scaling.py outputs/multiruns/<date>_<time>`
fits L(N) = E + A·N^(−α) to the completed runs' final val/loss (N the non-embedding parameters) with bootstrap 95%
CIs over seeds, checks that the law fitted without the largest size predicts it, and writes fit.json and fit.png
into the sweep dir. `--compute` fits L(C), C = 6·N·D, instead. Method: docs/scaling_fit.md."""

import argparse
import logging
from pathlib import Path

from gpt2lab.errors import exit_on_user_error
from gpt2lab.scaling import BOOTSTRAP_SEED, FIT_FILES, RESAMPLES, fit_sweep, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="a multirun's hydra.sweep.dir: runs over model size and seed")
    parser.add_argument("--compute", action="store_true", help="fit L(C), C = 6·N·D training FLOPs, not L(N)")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples of the seeds")
    parser.add_argument("--seed", type=int, default=BOOTSTRAP_SEED, help="of the bootstrap's random draws")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error():
        fit = fit_sweep(args.dir, "compute" if args.compute else "params", args.resamples, args.seed)
    print(summary(fit))
    print("wrote " + ", ".join(str(args.dir / f) for f in FIT_FILES))


if __name__ == "__main__":
    main()
