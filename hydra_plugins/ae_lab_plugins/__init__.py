"""ae_lab's Hydra plugins: the `sweeps/` search path and the GPU-queue launcher."""
