"""Data parallel on CPU: 2 processes (Lightning strategy=ddp, gloo) against one process with twice the
batch, both accumulating gradients over 2 micro-batches a step. The runs are real `scripts/train.py` processes
(Lightning's DDP launcher re-runs the script for rank 1), on the small corpus of conftest."""

import pytest
from conftest import B, T, batches_seen, scalars, train_run

N, K = 6, 3
DDP = ["accelerator.devices=2", "++trainer.strategy=ddp"]
# 30% val: 2 global batches of 2 ranks × B × T
# fp32 on every CPU: the comparison below is of float32 sums in two orders (bf16 rounding would swamp it)
COMMON = ["data.prepare.val_fraction=0.3", f"trainer.max_steps={N}", "train.val_every_n_steps=3"]
COMMON += ["train.monitor_every_n_steps=3"]  # the stability instruments at steps 3 and 6
COMMON += ["accelerator.precision=32-true", f"train.total_batch_size={2 * 2 * B * T}"]  # 2 micro-batches a step


def windows_by_step(run_dir, rank: int) -> list[tuple[str, list[str]]]:
    """[(epoch=E index=G, [window hashes])] per train batch of `rank`."""
    return [(line.split(" windows=")[0], line.split(" windows=")[1].split(",")) for line in batches_seen(run_dir, rank)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    root, data_dir = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("ddp_data")
    train_run(root / "single", corpus, data_dir, *COMMON, batch_size=2 * B)
    train_run(root / "ddp", corpus, data_dir, *COMMON, *DDP, f"callbacks.model_checkpoint.every_n_train_steps={K}")
    return root, data_dir


@pytest.mark.slow
def test_two_ranks_see_disjoint_halves_of_what_one_process_with_twice_the_batch_sees(runs):
    runs, _ = runs
    single, ranks = windows_by_step(runs / "single", 0), [windows_by_step(runs / "ddp", r) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 2 * N  # micro-batches
    assert len({position.split()[0] for position, _ in single}) >= 2, "the runs should cross an epoch boundary"
    for (position, windows), (position0, windows0), (position1, windows1) in zip(single, *ranks):
        assert position == position0 == position1  # the same global batch of the same pass
        assert windows0 + windows1 == windows  # rank r takes the r-th run of B windows
        assert not set(windows0) & set(windows1)


@pytest.mark.slow
def test_two_ranks_train_and_validate_like_one_process_with_twice_the_batch(runs):
    runs, _ = runs
    single, ddp = scalars(runs / "single")["train/loss"], scalars(runs / "ddp")["train/loss"]
    assert [s for s, _ in ddp] == list(range(1, N + 1))
    # the same update in exact arithmetic: DDP averages the two halves' mean gradients, one process takes
    # the mean over both. float32 sums in another order differ by ~1e-7 relative, which AdamW's
    # normalisation can amplify in gradient entries near zero: here the losses (~10, ulp 1e-6) differ by
    # at most 2e-6 over the 6 steps; 1e-4 leaves room for other CPUs' kernels, and a wrong or missing
    # window moves the loss by far more (~1e-2)
    assert [v for _, v in ddp] == pytest.approx([v for _, v in single], abs=1e-4)
    # val/loss is the mean over ranks of each rank's own half of the val batches
    val_single, val_ddp = scalars(runs / "single")["val/loss"], scalars(runs / "ddp")["val/loss"]
    assert [s for s, _ in val_ddp] == [s for s, _ in val_single] and len(val_ddp) == 2
    assert [v for _, v in val_ddp] == pytest.approx([v for _, v in val_single], abs=1e-4)


@pytest.mark.slow
def test_two_ranks_measure_the_stability_instruments_of_the_whole_batch(runs):
    """Each rank sees half the batch: the largest logits are the max over ranks, log Z the mean, and the
    gradients and updates (all-reduced) are the whole batch's: as one process with twice the batch measures them."""
    runs, _ = runs
    single, ddp = scalars(runs / "single"), scalars(runs / "ddp")
    tags = sorted(tag for tag in single if tag.startswith("stability/"))
    assert len(tags) == 4 * 3 + 2 + 2 * 3 and tags == sorted(tag for tag in ddp if tag.startswith("stability/"))
    for tag in tags:
        assert [s for s, _ in ddp[tag]] == [s for s, _ in single[tag]] == [3, 6]
        # float32 sums in another order, as the losses above; a rank's own half would be off by percents
        assert [v for _, v in ddp[tag]] == pytest.approx([v for _, v in single[tag]], rel=1e-3), tag


@pytest.mark.slow
def test_two_rank_run_resumes_exactly(runs, corpus, tmp_path):
    runs, data_dir = runs
    ckpt = runs / "ddp" / "checkpoints" / f"step{K:06d}.ckpt"
    train_run(tmp_path / "resumed", corpus, data_dir, *COMMON, *DDP, f"ckpt_path={ckpt}")
    for rank in (0, 1):
        assert batches_seen(tmp_path / "resumed", rank) == batches_seen(runs / "ddp", rank)[2 * K :]
    assert scalars(tmp_path / "resumed")["train/loss"] == scalars(runs / "ddp")["train/loss"][K:]
