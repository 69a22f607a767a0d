"""Masked-diffusion character LM on the King James Bible (or any text file), block-wise and/or end to end.

    python examples/text_mdm.py                              # both, same model, same layer evaluations
    python examples/text_mdm.py --strategy diffusionblocks --steps 2000
    python examples/text_mdm.py --backbone gpt2 --data my_corpus.txt

Prints the test bits per character (the ELBO bound, each masking time routed to its group) and a few
unconditional samples (ancestral unmasking, one group per step).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from text_lm import main  # noqa: E402

if __name__ == "__main__":
    main("masked", __doc__)
