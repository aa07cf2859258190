"""What `defectae bench` measures with: timing and memory probes over the same pieces the commands use."""
