"""HDF5 records of runs (:mod:`hdf5`), and their offline views: tables (:mod:`report`), pandas
frames (:mod:`frame`: :func:`load`, :func:`load_ranks`; pandas is needed only when they are
called), run-to-run comparison (:mod:`compare`), plots (:mod:`plot`). Guide: docs/analysis.md."""

from hpcattn.results.frame import load, load_ranks

__all__ = ["load", "load_ranks"]
