"""augment.py: not written yet (tracked in issue #5). Running it fails loudly instead of pretending."""
import sys

if __name__ == "__main__":
    sys.exit("augment.py is not written yet (issue #5); see README.md for what works today.")
