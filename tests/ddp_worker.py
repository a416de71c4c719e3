"""Train a tiny LoFiT adapter; run alone or under torchrun (DDP, gloo on CPU). Used by test_distributed.py.

python tests/ddp_worker.py OUT PER_DEVICE_BATCH OBJECTIVE
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_model, tiny_tokenizer  # noqa: E402

from peft_lofit import LoFiTConfig  # noqa: E402
from peft_lofit.checkpoint import save_adapter  # noqa: E402
from peft_lofit.distributed import finish  # noqa: E402
from peft_lofit.training import TrainSettings, train_adapter  # noqa: E402

ROWS = {
    "sft": [{"prompt": f"q{c}{c}", "completion": f" {c}b"} for c in "abcdefgh"],
    "dpo": [{"prompt": f"q{c}", "chosen": f" {c}a", "rejected": f" {c}z"} for c in "abcdefgh"],
}

FSDP = {
    "fsdp": "full_shard auto_wrap",
    "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
}

if __name__ == "__main__":
    output, batch, objective = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    # DPO's heads are all in layer 1, so the frozen-layer cache runs layer 0 once per sequence (on each rank).
    heads = [[1, 1], [1, 3]] if objective == "dpo" else [[0, 1], [1, 3]]
    config = LoFiTConfig(heads=heads, use_scaling=True)
    settings = TrainSettings(
        epochs=2,
        batch_size=batch,
        learning_rate=5e-2,
        output_dir=str(output / "trainer"),
        logging_steps=1,
        extra={"use_cpu": True, "dataloader_num_workers": 0, **(FSDP if "--fsdp" in sys.argv else {})},
    )
    model, trainer = train_adapter(tiny_model("llama"), tiny_tokenizer(), ROWS[objective], objective, config, settings)
    if trainer.is_world_process_zero():
        save_adapter(model, output / "adapter")
        cache = trainer.frozen_prefix_stats
        how = {
            "world_size": trainer.args.world_size,
            "fsdp": bool(trainer.is_fsdp_enabled),
            "cache_hits": cache and cache.hits,
        }
        (output / "distributed.json").write_text(json.dumps(how))
    finish()
