"""Autoregressive character LM with DiffusionBlocks on the King James Bible (or any text file).

    python examples/text_ar.py                               # both, same model, same layer evaluations
    python examples/text_ar.py --strategy diffusionblocks --temperature 0.8
    python examples/text_ar.py --backbone llama
    python examples/text_ar.py --strategy all                # + a plain next-token LM (true bits/char)
    python examples/text_ar.py --target-embedding input      # targets = the model's own input embedding

Each next character is denoised in B diffusion steps (one per group) and decoded greedily by default.
Prints the teacher-forced cross-entropy at σ_max and after the sampling chain (not perplexities: the
model has no likelihood) and continuations of prompts from the test text.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from text_lm import main  # noqa: E402

if __name__ == "__main__":
    main("autoregressive", __doc__)
