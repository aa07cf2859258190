"""Pure tensor and array code, no file I/O: tiling, SSIM, residuals, the inspector, losses, metrics."""
