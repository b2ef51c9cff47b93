"""Turn a GGUF file into a Hugging Face safetensors folder that vLLM can serve on the CPU.

vLLM 0.32's GGUF kernels are CUDA-only, so the real-engines tier (``scripts/real-engines.sh``)
dequantizes the shipped GGUF once with transformers' own GGUF reader and serves the folder.
Runs in the real-engines environment (torch, transformers, gguf, safetensors), never in the
proxy's:

    python scripts/gguf_to_hf.py MODEL.gguf OUT_DIR [--chat-template FILE]

The folder is written beside OUT_DIR and renamed into place, so a half-written one is never
mistaken for a finished one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def convert(gguf: Path, out: Path, chat_template: Path | None = None) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.bfloat16
    )
    tensors = {name: t.contiguous() for name, t in parsed["tensors"].items()}
    expected = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    if missing:
        raise SystemExit(f"error: {gguf.name} lacks tensors the model needs: {missing[:5]}")

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = "bfloat16"
    config.save_pretrained(partial)
    if chat_template is not None:
        tokenizer.chat_template = chat_template.read_text()
    tokenizer.save_pretrained(partial)
    # Stop on the end of a turn as well as the end of text (chat models mark turns).
    eos = {tokenizer.eos_token_id}
    for marker in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            eos.add(token)
    generation = {"eos_token_id": sorted(t for t in eos if t is not None)}
    if tokenizer.bos_token_id is not None:
        generation["bos_token_id"] = tokenizer.bos_token_id
    (partial / "generation_config.json").write_text(json.dumps(generation, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--chat-template", type=Path, help="a Jinja file to ship as the template")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        print(f"error: no GGUF file at {args.gguf}", file=sys.stderr)
        return 2
    convert(args.gguf.resolve(), args.out, args.chat_template)
    print(f"converted {args.gguf.name} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
