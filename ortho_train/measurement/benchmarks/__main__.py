"""`python -m ortho_train.measurement.benchmarks --benchmark tofu|muse …` (see `cli`)."""
import sys

from ortho_train.measurement.benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
