"""model.py: not written yet (tracked in issue #3). Running it fails loudly instead of pretending."""
import sys

if __name__ == "__main__":
    sys.exit("model.py is not written yet (issue #3); see README.md for what works today.")
