"""prepare_patches.py: not written yet (tracked in issue #6). Running it fails loudly instead of pretending."""
import sys

if __name__ == "__main__":
    sys.exit("prepare_patches.py is not written yet (issue #6); see README.md for what works today.")
