"""LoFiT's two steps on TruthfulQA, in Python: localize heads with DPO, then train offsets on the top K.

    python examples/truthfulqa_two_steps.py --k 8 --localize-epochs 5 --epochs 5
    accelerate launch --config_file examples/accelerate_ddp.yaml examples/truthfulqa_two_steps.py   # 2 processes

Uses the embedded SmolLM2-135M-Instruct unless --model names another causal LM.
"""

import argparse

from peft import PeftModel

from peft_lofit import LoFiTConfig
from peft_lofit.app.default_model import load_model_and_tokenizer
from peft_lofit.app.tasks import get_task
from peft_lofit.distributed import finish, is_main_process
from peft_lofit.localize import localize
from peft_lofit.training import TrainSettings, train_adapter


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--localize-epochs", type=float, default=5)
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--output", default="lofit_runs/truthfulqa_example")
    args = parser.parse_args()

    task = get_task("truthfulqa")
    model, tokenizer = load_model_and_tokenizer(args.model)
    rows = task.training_rows(
        "train", limit=args.train_limit
    )  # {"prompt": "Q: ... A:", "chosen": " best answer", "rejected": " ..."}

    # Step 1: scalings A on every head, DPO loss + lambda * sum |A|; heads ranked by ||A||.
    selection = localize(
        model,
        tokenizer,
        rows,
        "dpo",
        TrainSettings.localization(epochs=args.localize_epochs, output_dir=f"{args.output}/loc"),
    )
    heads = selection.top(args.k)
    if is_main_process():  # launched on several processes, all train and evaluate, one writes
        selection.save(f"{args.output}/heads.json")
        selection.heatmap(f"{args.output}/heads.png", k=args.k)
        print("selected heads:", heads)

    # Step 2: a fresh adapter with offsets v on those heads only (A fixed at 0).
    base_metrics = task.evaluate(model, tokenizer, limit=args.eval_limit, desc="base")
    peft_model, _ = train_adapter(
        model,
        tokenizer,
        rows,
        "dpo",
        LoFiTConfig(heads=heads),
        TrainSettings.offsets(epochs=args.epochs, output_dir=f"{args.output}/train"),
    )
    lofit_metrics = task.evaluate(peft_model, tokenizer, limit=args.eval_limit, desc="LoFiT")
    if is_main_process():
        peft_model.save_pretrained(f"{args.output}/adapter")
        print(f"base  MC1 {base_metrics['mc1']:.3f}  MC2 {base_metrics['mc2']:.3f}")
        print(f"LoFiT MC1 {lofit_metrics['mc1']:.3f}  MC2 {lofit_metrics['mc2']:.3f}  ({len(heads)} heads)")

        # The adapter loads like any PEFT adapter.
        fresh, _ = load_model_and_tokenizer(args.model)
        PeftModel.from_pretrained(fresh, f"{args.output}/adapter")
    finish()  # under a launcher: wait for every process and close the process group


if __name__ == "__main__":
    main()
