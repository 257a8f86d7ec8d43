"""HASS (harmonized speculative sampling) on the EAGLE family: top-K distillation + context alignment.

accelerate launch recipes/hass.py                                    # EAGLE-3 + HASS, embedded defaults
accelerate launch recipes/hass.py drafter.hass_topk=10 drafter.hass_align_steps=2
Same steps as recipes/eagle.py; only the YAML (recipes/configs/hass.yaml) differs.
Papers and config keys: docs/papers.md#hass. Every key: `specdistill config hass`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eagle import main  # noqa: E402

if __name__ == "__main__":
    main(recipe="hass")
