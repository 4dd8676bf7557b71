"""One module per op: Triton kernels, launchers and the torch custom-op registration (docs/CONTRACT.md)."""
