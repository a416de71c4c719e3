"""llama.cpp side of the plugin-free serving check (runs in the llama.cpp venv: llama_cpp, gguf, numpy, safetensors).

For each family: converts the merged LoFiT folder with llama.cpp's own ``convert_hf_to_gguf.py`` to GGUF (f32; f16
and q8_0 as extra rows) and the base folder (f32, the control that must fail); checks with ``gguf.GGUFReader`` that
every ``blk.N.attn_output.bias`` is in the file and equals ``model.layers.N.self_attn.o_proj.bias`` of the merged
safetensors; runs each file with ``llama_cpp.Llama(model_path=..., logits_all=True)`` and compares with the reference
of ``reference.py`` (the UNMERGED LoFiT model in transformers, float32):

- prompt log-probabilities over the whole vocabulary at every prompt position (log-softmax of llama.cpp's logits);
- greedy continuations (argmax, no EOS stop), token for token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare_greedy, load_reference, reference_logprobs, row, verdict, write_results  # noqa: E402

# Absolute log-probability tolerance per (GGUF type, KV-cache type). f32 weights with an f32 KV cache: float32 both
# sides, summation-order noise only (the reference's own float32-vs-float64 noise is ~5e-5). llama.cpp's default KV
# cache is f16, and f16 / q8_0 weights round further: those rows get looser bounds, still far below what the base
# model shows (>= 2).
TOLERANCE = {("f32", "f32"): 1e-3, ("f32", "f16"): 0.1, ("f16", "f16"): 0.1, ("q8_0", "f16"): 0.5}
KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16
# (model, GGUF type, KV-cache type): the first two rows are the check; the others show what default settings give.
VARIANTS = [
    ("merged", "f32", "f32"),
    ("base", "f32", "f32"),
    ("merged", "f32", "f16"),
    ("merged", "f16", "f16"),
    ("merged", "q8_0", "f16"),
]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
UNRECOGNIZED = "BPE pre-tokenizer was not recognized"


class ConversionError(RuntimeError):
    pass


def run_converter(python: str, converter: Path, folder: Path, outtype: str, target: Path) -> None:
    partial = target.with_suffix(".partial")
    command = [python, str(converter), str(folder), "--outtype", outtype, "--outfile", str(partial)]
    print("+ " + " ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ConversionError(result.stderr[-4000:])
    partial.rename(target)


def with_tokenizer_of(folder: Path, tokenizer_source: Path, stage: Path, config_source: Path) -> Path:
    """``folder``'s tensors (symlinks) with the tokenizer files of ``tokenizer_source`` (copies). A Qwen2 / Mistral
    folder also takes ``config_source``'s config.json (the merged folder's Llama form, the same computation): for a
    Qwen2 config transformers 5 loads any tokenizer as a Qwen2 tokenizer, whose pre-tokenizer llama.cpp does not know
    with this vocabulary."""
    import shutil

    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    config = json.loads((folder / "config.json").read_text())
    for item in folder.iterdir():
        if item.name not in TOKENIZER_FILES and not (item.name == "config.json" and config["model_type"] != "llama"):
            (stage / item.name).symlink_to(item.resolve())
    if config["model_type"] != "llama":
        (stage / "config.json").symlink_to((config_source / "config.json").resolve())
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, stage / name)
    return stage


def convert(
    python: str, converter: Path, folder: str, outtype: str, target: Path, tokenizer_source: Path, config_source: Path
) -> dict:
    """Convert ``folder`` as it is. Only where llama.cpp does not recognize its tokenizer's pre-tokenizer (the tiny
    models carry SmolLM2's vocabulary, which transformers 5 re-saves as a Qwen2 tokenizer for a Qwen2 config) retry
    with SmolLM2's own tokenizer files: the tokenizer is GGUF metadata only, the check feeds token ids."""
    if target.is_file():
        return {"convert_s": "cached"}
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        run_converter(python, converter, Path(folder), outtype, target)
        return {"convert_s": round(time.perf_counter() - start, 1)}
    except ConversionError as error:
        if UNRECOGNIZED not in str(error):
            raise
        first_error = [line for line in str(error).splitlines() if UNRECOGNIZED in line][-1]
    print(f"    {first_error.strip()}: retrying with the tokenizer files of {tokenizer_source}", flush=True)
    stage = with_tokenizer_of(Path(folder), tokenizer_source, target.parent / f"stage-{target.stem}", config_source)
    config_used = (
        "merged folder's (Llama form)" if (stage / "config.json").resolve().parent != Path(folder).resolve() else "own"
    )
    try:
        run_converter(python, converter, stage, outtype, target)
    except ConversionError as error:
        lines = [line for line in str(error).splitlines() if "Error" in line or UNRECOGNIZED in line]
        return {"conversion_failed": lines[-3:] or [str(error)[-500:]], "tokenizer_workaround": first_error.strip()}
    return {
        "convert_s": round(time.perf_counter() - start, 1),
        "tokenizer_workaround": f"{first_error.strip()} -> converted with SmolLM2's tokenizer files, {config_used} config",
    }


def bias_in_gguf(path: Path, merged_folder: str) -> dict:
    """Whether every layer's attn_output.bias is in the GGUF file and equals the merged checkpoint's o_proj.bias."""
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    tensors = {}
    for file in sorted(Path(merged_folder).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    layers = json.loads((Path(merged_folder) / "config.json").read_text())["num_hidden_layers"]
    reader = GGUFReader(str(path))
    found = {tensor.name: tensor for tensor in reader.tensors}
    missing, max_diff, nonzero = [], 0.0, 0
    for layer in range(layers):
        name = f"blk.{layer}.attn_output.bias"
        if name not in found:
            missing.append(name)
            continue
        value = np.asarray(found[name].data, dtype=np.float64).reshape(-1)
        expected = tensors[f"model.layers.{layer}.self_attn.o_proj.bias"].astype(np.float64).reshape(-1)
        max_diff = max(max_diff, float(np.abs(value - expected).max()))
        nonzero += bool(np.abs(expected).max() > 0)
    return {
        "attn_output_bias_tensors": layers - len(missing),
        "layers": layers,
        "missing": missing,
        "layers_with_nonzero_bias": nonzero,
        "max_abs_diff_vs_safetensors": max_diff,
        "tensor_type": found["blk.0.attn_output.bias"].tensor_type.name if "blk.0.attn_output.bias" in found else None,
    }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def check(path: Path, entry: dict, threads: int, kv: str) -> tuple[float, float, dict]:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=512,
        n_batch=512,
        n_threads=threads,
        type_k=KV_TYPES[kv],
        type_v=KV_TYPES[kv],
        verbose=False,
    )
    max_all = max_token = 0.0
    continuations = []
    steps = len(entry["greedy"][0])
    for ids, reference in zip(entry["prompt_ids"], reference_logprobs(entry)):
        llm.reset()
        llm.eval(ids)
        ours = log_softmax(np.array(llm.scores[: len(ids) - 1]))
        max_all = max(max_all, float(np.abs(ours - reference).max()))
        rows = np.arange(len(ids) - 1)
        max_token = max(max_token, float(np.abs(ours[rows, ids[1:]] - reference[rows, ids[1:]]).max()))
        tokens = []
        for _ in range(steps):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        continuations.append(tokens)
    del llm
    return max_all, max_token, compare_greedy(entry["greedy"], entry["greedy_margins"], continuations)


def check_variant(args, family: str, families: dict, variant: str, outtype: str, kv: str) -> dict:
    """Convert one folder of ``family`` (``variant``: merged or base) to a GGUF of ``outtype``, run it with a ``kv``
    KV cache and compare it with the reference: one results row (role "blocked" when the conversion failed)."""
    target = args.work / family / "gguf" / f"{variant}-{outtype}.gguf"
    entry = families[family]
    tokenizer_source = Path(entry.get("tokenizer_source") or families["llama"]["base"])  # older references lack it
    conversion = convert(
        sys.executable, args.converter, entry[variant], outtype, target, tokenizer_source, Path(entry["merged"])
    )
    described = {"engine": "llama.cpp", "family": family, "model": variant, "dtype": outtype, "kv_cache": kv}
    if "conversion_failed" in conversion:
        print(f"[llama.cpp] {family} {variant} {outtype}: conversion failed {conversion}", flush=True)
        return {**described, "role": "blocked", "passes": False, **conversion}
    bias = bias_in_gguf(target, entry["merged"]) if variant == "merged" else None
    if bias is not None:
        print(f"    GGUF attn_output.bias: {bias}", flush=True)
    start = time.perf_counter()
    max_all, max_token, greedy = check(target, entry, args.threads, kv)
    return row(
        "llama.cpp",
        family,
        variant,
        outtype,
        TOLERANCE[outtype, kv],
        max_all,
        greedy,
        max_abs_prompt_token_logprob_diff=max_token,
        kv_cache=kv,
        role="check" if (outtype, kv) == ("f32", "f32") else "info",
        compared="log-softmax of llama.cpp logits over the whole vocabulary at every prompt position",
        gguf=str(target),
        gguf_bytes=target.stat().st_size,
        attn_output_bias=bias,
        **conversion,
        run_s=round(time.perf_counter() - start, 1),
    )


def final_verdict(rows: list[dict]) -> dict:
    """``common.verdict`` of the rows, failed also where a GGUF lacks a layer's bias or holds another value."""
    result = verdict(rows)
    result["blocked"] = [f"{r['family']} {r['model']} {r['dtype']}" for r in rows if r["role"] == "blocked"]
    for item in rows:
        bias = item.get("attn_output_bias")
        if bias is not None and (bias["missing"] or bias["max_abs_diff_vs_safetensors"] > 1e-2):
            result["ok"] = False
            result["bias_problem"] = f"{item['family']} {item['dtype']}: {bias}"
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--converter", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--families", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from importlib.metadata import version

    import llama_cpp

    reference = load_reference(args.work)
    rows, started = [], time.perf_counter()
    versions = {
        "llama_cpp_python": llama_cpp.__version__,
        "gguf (vendored gguf-py)": version("gguf"),
        "transformers (converter)": version("transformers"),
        "torch (converter)": version("torch"),
    }
    for family in args.families or list(reference["families"]):
        for variant, outtype, kv in VARIANTS:
            rows.append(check_variant(args, family, reference["families"], variant, outtype, kv))
            write_results(args.results, "llama_cpp", section(rows, versions, started))
    result = {**section(rows, versions, started), "verdict": final_verdict(rows)}
    write_results(args.results, "llama_cpp", result)
    print(f"verdict: {result['verdict']}")
    return 0 if result["verdict"]["ok"] else 1


def section(rows, versions, started) -> dict:
    return {
        "versions": versions,
        "tolerance_note": (
            "absolute in log-probability: f32 weights + f32 KV cache 1e-3 (float32 both sides, summation-order noise "
            "only; transformers' own float32-vs-float64 noise is ~5e-5); with llama.cpp's default f16 KV cache 0.1 "
            "(f32 or f16 weights), q8_0 0.5; the base model differs by >= 2"
        ),
        "rows": list(rows),
        "wall_s": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
