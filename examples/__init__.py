"""The cross-framework matrix: data, models and the training harness.

Run from the project root: ``python -m examples.data`` (check the data),
``python -m examples.train ...`` (train one experiment in one framework).
Nothing here is part of the installed ``polyopt`` package; the comparison of
run records is (``polyopt.consistency``).
"""
