"""Private rule modules of the ``fold`` pass (see passes/fold.py for the rule list)."""
