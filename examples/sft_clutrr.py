"""LoFiT with supervised fine-tuning (loss on answer tokens only) on CLUTRR or MQuAKE, from Python.

    python examples/sft_clutrr.py --task clutrr --train-limit 512 --eval-limit 100

The same `run_pipeline` drives `lofit run`; PipelineSettings holds every hyperparameter.
"""

import argparse

from peft_lofit.app.pipeline import PipelineSettings, results_table, run_pipeline
from peft_lofit.training import TrainSettings


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["clutrr", "mquake"], default="clutrr")
    parser.add_argument("--model", default=None)
    parser.add_argument("--train-limit", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=2)
    args = parser.parse_args()

    settings = PipelineSettings(
        task=args.task,
        model=args.model,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        localize=TrainSettings.localization(epochs=args.epochs),  # the paper's step-1 recipe, fewer epochs
        train=TrainSettings.offsets(epochs=args.epochs),
        output_dir=f"lofit_runs/{args.task}",
    )
    results = run_pipeline(settings)
    print(results_table(results))


if __name__ == "__main__":
    main()
