"""``python -m hpcattn ...`` is the same as the ``hpcattn`` console script."""

from hpcattn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
