"""emoprune's pruning library: EMO-DIR and baselines on plain PyTorch models, without DVC, Prefect or MLflow.

Example (illustrative, not run)::

    from pruning import prune
    result = prune(model, torch.zeros(1, 3, 32, 32), train_loader, val_loader, target=0.5)
"""

from pruning.api import PruneResult, prune

__all__ = ["PruneResult", "prune"]
