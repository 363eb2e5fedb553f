"""`python -m wanlite.testing --task t2v-A14B --layout official --out DIR`: write a tiny fixture checkpoint."""
import argparse
import sys

from wanlite.specs import TASKS
from wanlite.testing.fixtures import LAYOUTS, write_fixture


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanlite.testing", description=__doc__)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_fixture(args.task, args.layout, args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
