"""mf_online's step per revealed batch is SGD on the batch's softmax cross-entropy."""

import numpy as np
import torch
import torch.nn.functional as F

from offline_eval.protocol import encode
from recsys.datasets import load_dataset
from offline_eval.mf import mf_online


def test_an_online_step_is_the_autograd_sgd_step():
    log = encode(load_dataset("synthetic", n_users=50, n_items=80, n_events=2_000, seed=2))
    model = mf_online(epochs=1)
    model.fit(log.history())
    batch = log.slice(log.n_history, log.n_history + 64)
    model.grow_rows(batch.n_users_known, batch.n_items_known)
    n = max(int(batch.items.max()) + 1, batch.n_items_known)
    users, items = torch.from_numpy(batch.users), torch.from_numpy(batch.items)
    u = model.user[users].clone().requires_grad_()
    it = model.item[:n].clone().requires_grad_()
    b = model.bias[:n].clone().requires_grad_()
    gu, gi, gb = torch.autograd.grad(F.cross_entropy(u @ it.T + b, items, reduction="sum"), (u, it, b))
    lr = model.cfg.online_lr
    user, item, bias = model.user.clone(), model.item.clone(), model.bias.clone()
    user.index_add_(0, users, -lr * gu)
    item[:n] -= lr * gi / len(users)
    bias[:n] -= lr * gb / len(users)

    before = model.user.clone()
    model.update(batch)
    assert (model.user - before).abs().max() > 1e-4  # the step moved the batch's users
    np.testing.assert_allclose(model.user, user, atol=1e-6)
    np.testing.assert_allclose(model.item, item, atol=1e-6)
    np.testing.assert_allclose(model.bias, bias, atol=1e-6)
