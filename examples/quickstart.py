"""Quick start: LoFiT with the usual PEFT calls (get_peft_model, train, save, load, merge).

Runs in seconds on a tiny random Llama so that it works anywhere; swap in any causal LM id or folder with
``python examples/quickstart.py --model <id-or-path>``.
"""

import argparse
import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_lofit  # noqa: F401  (registers LoFiT with PEFT)
from peft_lofit import LoFiTConfig


def load_model(name):
    if name:
        return AutoModelForCausalLM.from_pretrained(name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model id or local folder (default: a tiny random Llama)")
    args = parser.parse_args()

    base = load_model(args.model)
    vocab = base.config.vocab_size
    # Step 2 of LoFiT: learn one offset vector per selected head (here: three heads chosen by hand;
    # peft_lofit.localize() finds them for a task).
    config = LoFiTConfig(heads=[[0, 1], [2, 5], [3, 0]])
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    batch = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(20):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        adapted = model(batch).logits
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(load_model(args.model), folder).eval()
        with torch.no_grad():
            same = torch.allclose(reloaded(batch).logits, adapted, atol=1e-6)
        merged = reloaded.merge_and_unload()  # a plain transformers model; offsets now live in o_proj's bias
        with torch.no_grad():
            merged_same = torch.allclose(merged(batch).logits, adapted, atol=1e-4)
    print(f"reloaded adapter gives the same logits: {same}; merged model gives the same logits: {merged_same}")


if __name__ == "__main__":
    main()
