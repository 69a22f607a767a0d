"""``python -m lightning_diffusionblocks fit|validate|test|predict --config FILE`` (see :mod:`.cli`)."""

from lightning_diffusionblocks.cli import main

if __name__ == "__main__":
    main(prog="python -m lightning_diffusionblocks")
