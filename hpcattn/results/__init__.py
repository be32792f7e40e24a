"""HDF5 records of runs (:mod:`hdf5`), and their offline views: tables (:mod:`report`), plots (:mod:`plot`)."""
