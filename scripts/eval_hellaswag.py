"""HellaSwag accuracy of a checkpoint: `python scripts/eval_hellaswag.py ckpt=outputs/runs/<run>` (see
conf/eval_hellaswag.yaml). On accelerator.devices > 1, Lightning Fabric starts one process a device and each
scores a share of the examples."""

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from gpt2lab import hellaswag
from gpt2lab.accelerator import resolve_accelerator, set_up_process
from gpt2lab.checkpoint import load_model
from gpt2lab.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval_hellaswag")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        acc = cfg.accelerator
        resolve_accelerator(acc)  # each `auto` setting: the device's default
        fabric = L.Fabric(accelerator=acc.name, devices=acc.devices, precision=acc.precision)
        fabric.launch()  # from here on, this runs in every device's process
        set_up_process(acc.matmul_precision, acc.malloc)
        model = load_model(cfg.ckpt, cfg.hf, cfg.paths.runs_dir).to(fabric.device).eval()
        load = instantiate(cfg.hellaswag.load_examples)
        examples = hellaswag.rank_zero_first(load, fabric.is_global_zero, fabric.barrier)
        with fabric.autocast():
            counts = hellaswag.evaluate(
                model, examples, fabric.global_rank, fabric.world_size, cfg.hellaswag.batch_size,
                progress=fabric.is_global_zero,
            )  # fmt: skip
        scores = hellaswag.accuracies(fabric.all_reduce(counts, reduce_op="sum"))
    acc_norm, acc, n = scores["acc_norm"], scores["acc"], scores["examples"]
    fabric.print(f"HellaSwag: acc_norm {acc_norm:.4f}, acc {acc:.4f} ({n} examples)")


if __name__ == "__main__":
    main()
