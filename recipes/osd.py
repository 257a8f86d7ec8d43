"""Online distillation (OSD) on query logs: retrain the drafter in service, promote only a measured gain.

python recipes/osd.py --logs logs/ --serving serving/                  # one round (what cron runs)
specdistill retrain --logs logs/ --serving serving/ train.max_steps=50 # the same from an installed wheel
specdistill retrain rollback --serving serving/                        # back to the previous drafter
Works for any family whose export is in service (eagle, small_lm): the drafter section comes from
the serving export. Online keys (online.*): specdistill/online/retrain.py; guide: docs/retrain.md.
"""

import sys

from specdistill.online import retrain

RECIPE = "osd"


def main(argv=None, recipe=RECIPE):
    return retrain.main(sys.argv[1:] if argv is None else argv, recipe=recipe)


if __name__ == "__main__":
    raise SystemExit(main())
