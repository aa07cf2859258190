"""Dataset layouts, preparation, patch sampling, corruptions and the HDF5 stores."""
