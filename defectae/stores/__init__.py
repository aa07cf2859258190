"""One module per on-disk format (prepared, patches, residuals, checkpoint): name, version, writer, checked reader."""
