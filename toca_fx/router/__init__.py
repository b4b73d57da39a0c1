"""Learned caching (HarmoniCa): train a router whose gates decide, per step and branch, compute or reuse.

    result = toca_fx.router.train(model, (C, H, W), config=TrainConfig(num_steps=20), path="router.pt")
    backend = ToCaBackend(ToCaConfig(policy=Router.load("router.pt"), num_steps=20))
"""
from ..policies.learned import Router
from .train import TrainConfig, TrainResult, train

__all__ = ["Router", "TrainConfig", "TrainResult", "train"]
