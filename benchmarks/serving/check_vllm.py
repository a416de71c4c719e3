"""vLLM side of the plugin-free serving check (runs in the vLLM venv: vllm, numpy, json only).

For each family, loads the merged LoFiT folder (and, as the control that must fail, the base folder) with stock
``vllm.LLM(model=folder, dtype="float32")`` and compares with the reference of ``reference.py`` (the UNMERGED LoFiT
model in transformers, float32):

- greedy continuations (``temperature=0``, ``ignore_eos``), token for token;
- prompt log-probabilities (``SamplingParams(prompt_logprobs=K)``): for every prompt position, the prompt token and
  the K most likely tokens vLLM returns, each against the reference's float32 log-probability of that token.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare_greedy, load_reference, reference_logprobs, row, verdict, write_results  # noqa: E402

# float32 on both sides; differences come from summation order (GEMM blocking, attention kernels, RMSNorm). The
# reference's own float32 noise (float32 vs float64, transformers) is ~5e-5, the base model is >= 1 away.
TOLERANCE = 1e-3


def check(llm, entry: dict, top: int) -> tuple[float, float, dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in entry["prompt_ids"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=len(entry["greedy"][0]), ignore_eos=True, seed=0)
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    continuations = [list(output.outputs[0].token_ids) for output in outputs]
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top, detokenize=False)
    outputs = llm.generate(prompts, scoring, use_tqdm=False)
    max_all = max_token = 0.0
    for output, ids, reference in zip(outputs, entry["prompt_ids"], reference_logprobs(entry)):
        logprobs = output.prompt_logprobs  # [None, {token: Logprob}, ...]: entry i scores ids[i] given ids[:i]
        assert logprobs[0] is None and len(logprobs) == len(ids)
        for position in range(1, len(ids)):
            for token, value in logprobs[position].items():
                diff = abs(float(value.logprob) - float(reference[position - 1, token]))
                max_all = max(max_all, diff)
                if token == ids[position]:
                    max_token = max(max_token, diff)
    return max_all, max_token, compare_greedy(entry["greedy"], entry["greedy_margins"], continuations)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--families", nargs="+", default=None)
    parser.add_argument("--top", type=int, default=20, help="prompt_logprobs per position (vLLM's max_logprobs: 20)")
    args = parser.parse_args(argv)
    import vllm
    from vllm import LLM

    reference = load_reference(args.work)
    families = args.families or list(reference["families"])
    rows, started = [], time.perf_counter()
    for family in families:
        entry = reference["families"][family]
        for variant in ("merged", "base"):
            start = time.perf_counter()
            llm = LLM(
                model=entry[variant],
                dtype="float32",
                max_model_len=512,
                max_num_seqs=8,
                enforce_eager=True,
                seed=0,
            )
            load_s = time.perf_counter() - start
            start = time.perf_counter()
            max_all, max_token, greedy = check(llm, entry, args.top)
            rows.append(
                row(
                    "vllm",
                    family,
                    variant,
                    "f32",
                    TOLERANCE,
                    max_all,
                    greedy,
                    max_abs_prompt_token_logprob_diff=max_token,
                    compared=f"prompt token + top-{args.top} prompt_logprobs at every position",
                    folder=entry[variant],
                    load_s=round(load_s, 1),
                    run_s=round(time.perf_counter() - start, 1),
                )
            )
            del llm
            gc.collect()
            write_results(args.results, "vllm", partial(rows, vllm.__version__, started))
    section = partial(rows, vllm.__version__, started)
    section["verdict"] = verdict(rows)
    write_results(args.results, "vllm", section)
    print(f"verdict: {section['verdict']}")
    return 0 if section["verdict"]["ok"] else 1


def partial(rows, version, started) -> dict:
    import torch
    import transformers

    return {
        "versions": {"vllm": version, "torch": torch.__version__, "transformers": transformers.__version__},
        "tolerance_note": (
            f"{TOLERANCE:g} absolute in log-probability, float32 both sides: summation-order noise only (transformers' "
            "own float32-vs-float64 noise on these models is ~5e-5; the base model differs by >= 1)"
        ),
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
        "rows": list(rows),
        "wall_s": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
