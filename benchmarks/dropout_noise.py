"""How far MiniLM-L6's own dropout moves its sentence embeddings.

Mean cosine between the model's embeddings in train mode (its dropout on:
p = 0.1 on hidden states and attention) and in eval mode, on the 512
held-out sentences of ``bench_qat_minilm.py``: the noise a student distilled
with its dropout on chases (see BENCHMARKS.md, "Without dropout in the
student"). One forward pass, seed 0.

Run: ``.venv/bin/python benchmarks/dropout_noise.py``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import embed, make_batches  # noqa: E402

from tnquant.cli.datasets import load_minilm, split_corpus  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    _, test = split_corpus(1408, 512, seed=0)
    held_out = make_batches(tokenizer, test)
    reference = embed(model, held_out)
    model.train()
    with torch.no_grad():
        noisy = torch.cat([model(**b) for b in held_out])
    cos = F.cosine_similarity(noisy, reference, dim=-1)
    print(
        f"MiniLM-L6 with its dropout vs eval mode, {len(test)} held-out sentences: "
        f"mean cosine {cos.mean().item():.4f} (min {cos.min().item():.4f})"
    )


if __name__ == "__main__":
    main()
