"""loss.py: not written yet (tracked in issue #4). Running it fails loudly instead of pretending."""
import sys

if __name__ == "__main__":
    sys.exit("loss.py is not written yet (issue #4); see README.md for what works today.")
