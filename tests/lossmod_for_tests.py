"""An importable loss for the SKMPalettizationCallback(loss_fn="<import path>") tests."""

from torch import nn


def mse(module, batch):
    return nn.functional.mse_loss(module(batch[0]), batch[1])
