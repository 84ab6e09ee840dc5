"""eval_probe.py: not written yet (tracked in issue #8). Running it fails loudly instead of pretending."""
import sys

if __name__ == "__main__":
    sys.exit("eval_probe.py is not written yet (issue #8); see README.md for what works today.")
