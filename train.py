"""train.py: not written yet (tracked in issue #7). Running it fails loudly instead of pretending."""
import sys

if __name__ == "__main__":
    sys.exit("train.py is not written yet (issue #7); see README.md for what works today.")
