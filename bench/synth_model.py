"""Write a llama-architecture GGUF of a given size with zero F16 weights and a real tokenizer.

The tokenizer and chat template come from ../shared/gpu/vocab.json.gz (the default model's,
extracted there). Tensors are streamed to disk one at a time, so an 8 GB file needs little RAM.
Zero weights produce nonsense at real speed: right for load-time figures, not for quality.

usage: python -m bench.synth_model OUT.gguf SIZE_GB
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import gguf
import numpy as np

from bench.common import ROOT

VOCAB = ROOT.parent / "shared/gpu/vocab.json.gz"

# (n_embd, n_layer, n_head, n_kv_head, n_ff) per target size, F16.
SHAPES = {
    0.1: (512, 2, 8, 4, 1536),
    1: (1024, 28, 16, 4, 4096),
    4: (2048, 30, 32, 8, 8192),
    8: (2048, 62, 32, 8, 8192),
}
# Sizes of the cold-storage bench only (bench/cold_start_storage.py); P2 runs SHAPES.
COLD_STORAGE_SHAPES = {
    0.7: (1024, 16, 16, 4, 4096),
    2: (2048, 13, 32, 8, 8192),
}


def write_model(out: Path, size_gb: float) -> Path:
    """Write the synthetic model unless a file of that name already exists."""
    if out.exists():
        return out
    n_embd, n_layer, n_head, n_kv, n_ff = {**SHAPES, **COLD_STORAGE_SHAPES}[size_gb]
    meta = json.loads(gzip.decompress(VOCAB.read_bytes()))
    tokens = meta["tokenizer.ggml.tokens"][1]
    writer = gguf.GGUFWriter(str(out) + ".partial", "llama")
    writer.add_name(f"synthetic-llama-{size_gb}gb")
    writer.add_context_length(8192)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"][1])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"][1])
    writer.add_token_list(tokens)
    writer.add_token_types(meta["tokenizer.ggml.token_type"][1])
    writer.add_token_merges(meta["tokenizer.ggml.merges"][1])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"][1])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"][1])
    writer.add_add_bos_token(False)
    writer.add_chat_template(meta["tokenizer.chat_template"][1])

    head_dim = n_embd // n_head
    shapes: list[tuple[str, tuple[int, ...], type]] = [
        ("token_embd.weight", (len(tokens), n_embd), np.float16),
        ("output_norm.weight", (n_embd,), np.float32),
        ("output.weight", (len(tokens), n_embd), np.float16),
    ]
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes += [
            (p + "attn_norm.weight", (n_embd,), np.float32),
            (p + "attn_q.weight", (n_embd, n_embd), np.float16),
            (p + "attn_k.weight", (n_kv * head_dim, n_embd), np.float16),
            (p + "attn_v.weight", (n_kv * head_dim, n_embd), np.float16),
            (p + "attn_output.weight", (n_embd, n_embd), np.float16),
            (p + "ffn_norm.weight", (n_embd,), np.float32),
            (p + "ffn_gate.weight", (n_ff, n_embd), np.float16),
            (p + "ffn_up.weight", (n_ff, n_embd), np.float16),
            (p + "ffn_down.weight", (n_embd, n_ff), np.float16),
        ]
    for name, shape, dtype in shapes:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, shape, dtype in shapes:
        data = np.ones(shape, dtype=dtype) if len(shape) == 1 else np.zeros(shape, dtype=dtype)
        writer.write_tensor_data(data)
    writer.close()
    Path(str(out) + ".partial").rename(out)
    return out


if __name__ == "__main__":
    print(write_model(Path(sys.argv[1]), float(sys.argv[2])))
