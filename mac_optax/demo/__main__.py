"""``python -m mac_optax.demo --help``."""

import sys

from mac_optax.demo import cli

if __name__ == '__main__':
  cli.main(sys.argv[1:])
