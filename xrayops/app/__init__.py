"""The application layer: what a user runs, composed from the core (`xrayops`) and the adapters
(`components`, `pipelines`, `serving`). The `xrayops` CLI, the demo loop and the drift scenario live
here, so that the core never imports kfp or kserve."""
