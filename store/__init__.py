"""The state store on a host: paths, the guest-image cache, checkpoints and clones, a side's
saved state and the checkpoint's trees, and checkpoints moved between sites (export/import)."""
