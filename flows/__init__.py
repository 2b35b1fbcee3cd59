"""fedward's control plane: Prefect flows an MLOps engineer runs."""
