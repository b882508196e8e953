"""``python -m xrayjax.train``: the training CLI (see :func:`xrayjax.training.main`)."""

from xrayjax.training import main

if __name__ == "__main__":
    raise SystemExit(main())
