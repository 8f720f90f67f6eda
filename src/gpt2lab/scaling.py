"""Scaling laws from a sweep over model size: fit L(N) = E + A·N^(−α) to the runs' final val/loss, N the
non-embedding parameters (Kaplan et al. 2020's (N_c/N)^α_N plus an irreducible loss E, as Hoffmann et al. 2022),
with bootstrap 95% CIs over seeds; or L(C), C = 6·N·D the training compute. Then the check that the law predicts:
fit every size but the largest and see whether the largest's measured mean loss falls inside the 95% prediction
interval. `python scripts/fit_scaling.py <sweep dir>` writes fit.json and fit.png into the sweep dir
(docs/scaling_fit.md)."""

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.optimize import curve_fit
from scipy.stats import t as student_t

from gpt2lab.errors import DataError
from gpt2lab.metrics import VAL_LOSS
from gpt2lab.model import GPT
from gpt2lab.sweep import FINAL_METRICS, read_events, read_run_status, run_dirs, scalar_series

log = logging.getLogger(__name__)

FIT_FILES = ("fit.json", "fit.png")
LEVEL = 0.95  # of every interval here: CIs, the fit's band, the prediction interval
PERCENTILES = (100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2)  # 2.5, 97.5
# what the law is a function of: its name, its symbol, and how a run gives its value
SCALES: dict[str, tuple[str, str, Callable[["RunPoint"], int]]] = {
    "params": ("non-embedding parameters", "N", lambda p: p.n_params),
    "compute": ("training compute 6·N·D (FLOPs)", "C", lambda p: 6 * p.n_params * p.tokens),
}
MIN_SIZES = 3  # E, A, α: three unknowns
RESAMPLES = 1000  # bootstrap resamples: the 2.5th and 97.5th percentiles from 25 draws beyond each
BOOTSTRAP_SEED = 0  # of the resampling RNG: the same sweep gives the same CIs
# what the hold-out's interval is an interval for (fit.json says it beside the interval)
INTERVAL_COVERS = (
    "the mean final val/loss of the held-out size's m seeds, 95% of the time if the law holds there: the law fitted "
    "on the other sizes, its bootstrap spread at that size plus the seed noise of an m-seed mean (the seed SD "
    "pooled within the fitted sizes, Student t on their degrees of freedom); not an error in the law's form"
)
ALPHA_BOUNDS = (0.0, 5.0)  # α > 0: loss falls with scale; 5 is far beyond any measured LM exponent (0.05–0.5)


def non_embedding_params(model_config) -> int:
    """Kaplan et al.'s N: every parameter but the token and position embeddings and an untied lm_head, i.e. the
    blocks and the final norm. Not GPT.num_params(non_embedding=True): that is the FLOPs convention of 6·N, which
    keeps the tied embedding because it is also the output matmul; a scaling law in N leaves it out, since the
    embedding's size follows the vocabulary, not the model (Kaplan et al. 2020, section 2.1 and figure 6)."""
    with torch.device("meta"):  # shapes only: no memory, no init
        model = GPT(model_config)
    embeddings = ("transformer.wte.", "transformer.wpe.", "lm_head.")  # named_parameters lists a tied one once
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(embeddings))


@dataclass(frozen=True)
class RunPoint:
    run: str  # the run's dir, relative to the sweep dir
    seed: int
    n_params: int  # N: non_embedding_params of its model
    tokens: int | None  # D: tokens trained on (final/tokens_seen)
    val_loss: float  # its last val/loss
    setting: str = ""  # its overrides but the seed: the runs of one size must share it


def read_sweep(sweep_dir: str | Path) -> tuple[list[RunPoint], list[tuple[str, str]]]:
    """Each completed run of the sweep as a RunPoint; and every other run with why it was left out."""
    sweep_dir = Path(sweep_dir)
    runs = run_dirs(sweep_dir)
    if not runs:
        raise DataError(
            f"no Hydra runs (*/.hydra/overrides.yaml) under {sweep_dir}: pass the sweep dir of a multirun over "
            "model size, e.g. outputs/multiruns/<date>_<time>"
        )
    points, left_out = [], []
    for run_dir in runs:
        name = str(run_dir.relative_to(sweep_dir))
        ended = read_run_status(run_dir)
        events = read_events(run_dir)
        val_loss, tokens = scalar_series(events, VAL_LOSS), scalar_series(events, FINAL_METRICS[1])
        if ended.status != "completed" or not val_loss:
            left_out.append((name, str(ended) if ended.status != "completed" else f"no {VAL_LOSS} logged"))
            continue
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
        points.append(
            RunPoint(
                run=name,
                seed=cfg.seed,
                n_params=non_embedding_params(instantiate(cfg.model)),
                tokens=int(tokens[-1][1]) if tokens else None,
                val_loss=val_loss[-1][1],
                setting=",".join(o for o in overrides if o.split("=")[0] != "seed"),
            )
        )
    return points, left_out


@dataclass(frozen=True)
class Law:
    """L(x) = E + A·x^(−α): E the irreducible loss, A·x^(−α) the part that scale removes."""

    E: float
    A: float
    alpha: float

    def __call__(self, x) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha


def fit_law(x: np.ndarray, y: np.ndarray, start: Law | None = None) -> Law:
    """The least-squares Law through the points (x, y), from `start` (else from a grid over α).

    Fitted as E + exp(a − α·ln(x / x_ref)), x_ref the geometric mean of x: exp(a) is then the reducible loss in the
    middle of the sweep, of order 1, where A itself spans orders of magnitude as α moves (A = exp(a)·x_ref^α), and
    exp keeps it positive without a bound."""
    log_ref = np.log(x).mean()
    log_u = np.log(x) - log_ref

    def law(log_u, E, a, alpha):
        return E + np.exp(a - alpha * log_u)

    if start is None:
        E, b, alpha = grid_start(log_u, y)
        p0 = (E, np.log(b), alpha)
    else:
        p0 = (start.E, np.log(start.A) - start.alpha * log_ref, start.alpha)
    lower, upper = (0.0, -np.inf, ALPHA_BOUNDS[0]), (np.inf, np.inf, ALPHA_BOUNDS[1])
    (E, a, alpha), _ = curve_fit(law, log_u, y, p0=np.clip(p0, lower, upper), bounds=(lower, upper), max_nfev=20_000)
    return Law(E=float(E), A=float(np.exp(a + alpha * log_ref)), alpha=float(alpha))


def grid_start(log_u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(E, b, α) of y ≈ E + b·u^(−α) at the best α of a grid: for a fixed α the law is a line in v = u^(−α), so
    E and b are its intercept and slope (E clipped at 0, b > 0). A start near the optimum, for any data."""
    alphas = np.geomspace(0.01, ALPHA_BOUNDS[1], 200)[:, None]  # (G, 1)
    v = np.exp(-alphas * log_u)  # (G, n)
    dv = v - v.mean(axis=1, keepdims=True)
    slope = (dv * (y - y.mean())).sum(axis=1) / (dv**2).sum(axis=1)  # (G,)
    intercept = y.mean() - slope * v.mean(axis=1)
    through_zero = (v @ y) / (v**2).sum(axis=1)  # the slope with E = 0, where the free intercept is negative
    slope, intercept = np.where(intercept < 0, through_zero, slope), np.clip(intercept, 0, None)
    sse = ((intercept[:, None] + slope[:, None] * v - y) ** 2).sum(axis=1)
    sse[slope <= 0] = np.inf  # a law whose loss grows with scale
    best = int(np.argmin(sse))
    return float(intercept[best]), float(max(slope[best], 1e-12)), float(alphas[best, 0])


def bootstrap(
    x: np.ndarray, y: np.ndarray, sizes: list[np.ndarray], law: Law, n_boot: int, rng: np.random.Generator
) -> list[Law]:
    """The law refitted to n_boot resamples of the seeds: each size keeps its count of runs, drawn with replacement
    from its own runs, so a resample varies only what seeds vary. A resample whose fit fails is dropped.

    Each run's deviation from its size's mean is first scaled by √(n/(n−1)), n the size's runs: resampled as they
    are, n seeds vary their mean by only (n−1)/n of its variance (the modified residuals r/√(1−h), h = 1/n, of
    Davison & Hinkley, Bootstrap Methods, 1997); with 3 seeds the CIs would cover ~3/4 of the time, not 95%."""
    adjusted = y.astype(float)
    for runs in sizes:
        n, mean = len(runs), y[runs].mean()
        adjusted[runs] = mean + np.sqrt(n / (n - 1)) * (y[runs] - mean)
    laws = []
    for _ in range(n_boot):
        resample = np.concatenate([rng.choice(runs, size=len(runs), replace=True) for runs in sizes])
        try:
            laws.append(fit_law(x[resample], adjusted[resample], start=law))
        except (RuntimeError, ValueError):  # curve_fit: no convergence, or a non-finite residual
            continue
    return laws


def percentile_ci(values) -> tuple[float, float]:
    low, high = np.percentile(values, PERCENTILES)
    return float(low), float(high)


@dataclass
class HoldOut:
    """The law fitted without the largest size, against that size's measured mean loss."""

    x: float  # the held-out size (N or C)
    seeds: int  # its runs, m
    measured: float  # their mean final val/loss
    measured_sd: float  # their standard deviation (for the record: the interval uses the fitted sizes' seed noise)
    predicted: float  # the law fitted on the other sizes, at x
    interval: tuple[float, float]  # the 95% prediction interval for `measured`
    inside: bool
    law: Law  # fitted on the other sizes
    ci: dict[str, tuple[float, float]]  # its parameters' 95% CIs


@dataclass
class ScalingFit:
    scale: str  # a key of SCALES: params (L(N)) or compute (L(C))
    law: Law
    ci: dict[str, tuple[float, float]]  # 95% bootstrap percentile CI of E, A, alpha
    n_boot: int  # resamples asked for
    failed_fits: int  # resamples whose fit did not converge (left out of the CIs)
    seed: int  # of the bootstrap's RNG
    holdout: HoldOut | None
    holdout_note: str  # why there is none, or empty
    points: list[RunPoint]
    warnings: list[str]  # the parameters the fit pressed against a bound (bound_warnings)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    laws: list[Law] = field(default_factory=list, repr=False)  # the bootstrap's fits, for the band

    def x(self) -> np.ndarray:
        return scale_values(self.points, self.scale)


def scale_values(points: list[RunPoint], scale: str) -> np.ndarray:
    """Each point's N or C (as floats: C of a large run passes 2^63)."""
    return np.array([float(SCALES[scale][2](p)) for p in points])


def group_by_size(points: list[RunPoint], scale: str) -> dict[int, list[int]]:
    """Indices of the points at each value of the scale, smallest first; checked that they can be fitted."""
    value = SCALES[scale][2]
    sizes: dict[int, list[int]] = {}
    for i, point in enumerate(points):
        sizes.setdefault(value(point), []).append(i)
    sizes = dict(sorted(sizes.items()))
    symbol = SCALES[scale][1]
    if len(sizes) < MIN_SIZES:
        raise DataError(
            f"{len(sizes)} model sizes ({symbol} = {', '.join(f'{s:.3g}' for s in sizes)}): fitting E, A and α needs "
            f"at least {MIN_SIZES}; sweep model.n_embd over {MIN_SIZES} or more values ({MIN_SIZES + 1} for the hold-out check)"
        )
    for size, runs in sizes.items():
        if len(runs) < 2:
            raise DataError(
                f"{symbol} = {size:.3g} has 1 completed run ({points[runs[0]].run}): the bootstrap resamples each "
                "size's seeds; run at least 2 seeds per size, e.g. seed=1,2,3"
            )
        settings = {points[i].setting for i in runs}
        if len(settings) > 1:
            raise DataError(
                f"the runs at {symbol} = {size:.3g} differ in more than their seed ({' | '.join(sorted(settings))}): "
                "each size needs one setting; fit a sweep dir that varies only the model size and the seed"
            )
    return sizes


def fit_scaling(
    points: list[RunPoint], scale: str = "params", n_boot: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> ScalingFit:
    """The law fitted to every point (each run is one; a size's seeds weigh as its count), the bootstrap CIs of
    its parameters, and the hold-out check of the largest size (when at least MIN_SIZES others are left)."""
    if scale not in SCALES:
        raise DataError(f"scale={scale!r}: must be one of {', '.join(SCALES)}")
    if not points:
        raise DataError("no completed runs to fit: every run of the sweep stopped, failed or is still running")
    if scale == "compute" and (missing := [p.run for p in points if p.tokens is None]):
        raise DataError(f"no final/tokens_seen in {', '.join(missing)}: L(C) needs each run's tokens; fit L(N)")
    sizes = [np.array(runs) for runs in group_by_size(points, scale).values()]
    x, y = scale_values(points, scale), np.array([p.val_loss for p in points])
    rng = np.random.default_rng(seed)
    law, laws = fit_with_bootstrap(x, y, sizes, n_boot, rng)
    holdout, note = None, ""
    if len(sizes) > MIN_SIZES:
        holdout = hold_out_largest(x, y, sizes, n_boot, rng)
    else:
        note = f"needs {MIN_SIZES + 1} sizes or more: {MIN_SIZES} to fit without the largest"
    return ScalingFit(
        scale=scale,
        law=law,
        ci=parameter_cis(laws),
        n_boot=n_boot,
        failed_fits=n_boot - len(laws),
        seed=seed,
        holdout=holdout,
        holdout_note=note,
        points=points,
        warnings=bound_warnings(law),
        laws=laws,
    )


def bound_warnings(law: Law) -> list[str]:
    """What it means when the fit ends on a bound: the points do not have the law's shape there."""
    warnings = []
    if law.E < 1e-6:
        warnings.append("E is at its bound 0: the loss does not level off within the sweep (yet)")
    if law.alpha < 1e-6:
        warnings.append("α is at its bound 0: the loss does not fall with size")
    if law.alpha > ALPHA_BOUNDS[1] * (1 - 1e-6):
        warnings.append(f"α is at its bound {ALPHA_BOUNDS[1]}: the loss falls faster than any power law's")
    return warnings


def fit_with_bootstrap(
    x: np.ndarray, y: np.ndarray, sizes: list[np.ndarray], n_boot: int, rng: np.random.Generator
) -> tuple[Law, list[Law]]:
    """The law fitted to the points of `sizes`, and its refits to n_boot resamples of their seeds."""
    runs = np.concatenate(sizes)
    advice = "the points do not follow E + A·x^(−α) (does the loss fall with size?); see the sweep's summary.md"
    try:
        law = fit_law(x[runs], y[runs])
    except RuntimeError as e:  # curve_fit found no minimum within its evaluations
        raise DataError(f"the fit did not converge ({e}): {advice}") from e
    laws = bootstrap(x, y, sizes, law, n_boot, rng)
    if len(laws) < n_boot / 2:
        raise DataError(f"{n_boot - len(laws)} of {n_boot} bootstrap fits failed: {advice}")
    return law, laws


def parameter_cis(laws: list[Law]) -> dict[str, tuple[float, float]]:
    return {name: percentile_ci([getattr(law, name) for law in laws]) for name in ("E", "A", "alpha")}


def hold_out_largest(
    x: np.ndarray, y: np.ndarray, sizes: list[np.ndarray], n_boot: int, rng: np.random.Generator
) -> HoldOut:
    """Fit on every size but the largest; the 95% interval for the largest's m-seed mean is the bootstrap's
    predictions there, each plus a draw of the seed noise of an m-seed mean: s/√m · t, s the seed SD pooled within
    the fitted sizes and t Student's on its degrees of freedom (s is itself an estimate)."""
    *fitted, held = sizes
    law, laws = fit_with_bootstrap(x, y, fitted, n_boot, rng)
    deviations = np.concatenate([y[runs] - y[runs].mean() for runs in fitted])
    dof = sum(len(runs) - 1 for runs in fitted)
    pooled_sd = float(np.sqrt((deviations**2).sum() / dof))
    x_held, m = float(x[held[0]]), len(held)
    predictions = np.array([boot(x_held) for boot in laws])
    draws = predictions + pooled_sd / np.sqrt(m) * rng.standard_t(dof, size=len(predictions))
    interval = percentile_ci(draws)
    measured = float(y[held].mean())
    return HoldOut(
        x=x_held,
        seeds=m,
        measured=measured,
        measured_sd=float(y[held].std(ddof=1)),
        predicted=float(law(x_held)),
        interval=interval,
        inside=interval[0] <= measured <= interval[1],
        law=law,
        ci=parameter_cis(laws),
    )


def fit_sweep(
    sweep_dir: str | Path, scale: str = "params", n_boot: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> ScalingFit:
    """Read the sweep, fit, write fit.json and fit.png into it; return the fit."""
    sweep_dir = Path(sweep_dir)
    points, left_out = read_sweep(sweep_dir)
    for run, why in left_out:
        log.warning("%s left out: %s", run, why)
    if not points:
        raise DataError(
            f"no completed runs under {sweep_dir} ({len(left_out)} left out: "
            f"{'; '.join(f'{run}: {why}' for run, why in left_out)}): nothing to fit"
        )
    fit = fit_scaling(points, scale, n_boot, seed)
    fit.left_out = left_out
    (sweep_dir / FIT_FILES[0]).write_text(json.dumps(fit_record(fit, sweep_dir), indent=2, ensure_ascii=False) + "\n")
    plot_fit(fit, sweep_dir / FIT_FILES[1])
    return fit


def fit_record(fit: ScalingFit, sweep_dir: Path) -> dict:
    """fit.json: the law, its CIs, the hold-out result and every run used or left out."""
    name, symbol, _ = SCALES[fit.scale]
    holdout = None if fit.holdout is None else asdict(fit.holdout) | {"interval_covers": INTERVAL_COVERS}
    return {
        "sweep_dir": str(sweep_dir),
        "law": f"L({symbol}) = E + A·{symbol}^(−alpha), {symbol} = {name}",
        "params": asdict(fit.law),
        "ci95": fit.ci,
        "bootstrap": {
            "resamples": fit.n_boot,
            "failed_fits": fit.failed_fits,
            "seed": fit.seed,
            "resampled": "each size's seeds, with replacement; deviations from the size's mean scaled by √(n/(n−1))",
        },
        "holdout": holdout,
        "holdout_note": fit.holdout_note,
        "warnings": fit.warnings,
        "runs": [asdict(p) | {symbol: SCALES[fit.scale][2](p)} for p in fit.points],
        "left_out": [{"run": run, "why": why} for run, why in fit.left_out],
    }


def size_means(fit: ScalingFit) -> list[tuple[float, float, float, int]]:
    """(x, mean loss, half-width of its 95% CI over seeds (Student t), seeds) per size."""
    x, y = fit.x(), np.array([p.val_loss for p in fit.points])
    rows = []
    for size in np.unique(x):
        values = y[x == size]
        half = student_t.ppf(PERCENTILES[1] / 100, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
        rows.append((float(size), float(values.mean()), float(half), len(values)))
    return rows


def summary(fit: ScalingFit) -> str:
    """A few lines: the law with its CIs, the hold-out verdict, the runs left out."""
    symbol = SCALES[fit.scale][1]
    means = size_means(fit)
    fewest, most = min(m[3] for m in means), max(m[3] for m in means)
    lines = [
        (
            f"L({symbol}) = E + A·{symbol}^(−α) over {len(fit.points)} runs ({len(means)} sizes, "
            f"{fewest if fewest == most else f'{fewest}–{most}'} seeds each); 95% CIs from {len(fit.laws)} "
            "resamples of the seeds"
        ),
    ]
    for name, label in (("E", "E"), ("A", "A"), ("alpha", "α")):
        low, high = fit.ci[name]
        lines.append(f"  {label} = {getattr(fit.law, name):.4g}  [{low:.4g}, {high:.4g}]")
    h = fit.holdout
    if h is None:
        lines.append(f"hold-out: none ({fit.holdout_note})")
    else:
        lines.append(
            f"hold-out: fitted without {symbol} = {h.x:.3g}, predicts {h.predicted:.4f} "
            f"(95% PI of a {h.seeds}-seed mean: {h.interval[0]:.4f}–{h.interval[1]:.4f}); measured "
            f"{h.measured:.4f}: {'inside' if h.inside else 'OUTSIDE'}"
        )
    lines += [f"warning: {warning}" for warning in fit.warnings]
    lines += [f"left out: {run} ({why})" for run, why in fit.left_out]
    return "\n".join(lines)


def plot_fit(fit: ScalingFit, path: Path) -> None:
    """Per size the mean loss ± its 95% CI over seeds (and each seed), the law with its 95% bootstrap band, and the
    hold-out: the law fitted without the largest size, and the prediction interval at it beside what was measured."""
    try:
        import matplotlib
    except ImportError:
        log.warning("no plot %s: matplotlib is missing; install it with `pip install -e '.[sweeps]'`", path)
        return
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    name, symbol, _ = SCALES[fit.scale]
    x = fit.x()
    grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(x, [p.val_loss for p in fit.points], s=8, color="0.6", label="a run (seed)", zorder=2)
    sx, smean, shalf, _ = zip(*size_means(fit))
    ax.errorbar(sx, smean, yerr=shalf, fmt="o", color="C0", capsize=3, label="mean ± 95% CI over seeds", zorder=3)
    law = fit.law
    ax.plot(grid, law(grid), color="C0",
            label=f"fit: {law.E:.3g} + {law.A:.3g}·{symbol}^−{law.alpha:.3g}")  # fmt: skip
    band = np.percentile([boot(grid) for boot in fit.laws], PERCENTILES, axis=0)
    ax.fill_between(grid, *band, color="C0", alpha=0.2, label="95% bootstrap band")
    if (h := fit.holdout) is not None:
        ax.plot(grid, h.law(grid), color="C1", linestyle="--", label=f"fit without {symbol} = {h.x:.3g}")
        beside = h.x * 1.15  # not under the held-out size's own points
        ax.errorbar([beside], [h.predicted], yerr=[[h.predicted - h.interval[0]], [h.interval[1] - h.predicted]],
                    fmt="D", color="C1", capsize=5, markersize=4, label="its prediction ± 95% PI (beside)")  # fmt: skip
        ax.scatter([h.x], [h.measured], marker="*", s=140, color="C3" if not h.inside else "C2", zorder=4,
                   label=f"held out: measured mean ({'inside' if h.inside else 'outside'})")  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel=f"{symbol}: {name}", ylabel=f"final {VAL_LOSS}", title=f"{path.parent.name}: L({symbol})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
