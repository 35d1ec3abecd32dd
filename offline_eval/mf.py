"""Matrix factorisation baselines: `mf_static` (trained once on history) and `mf_online`
(the same, then one SGD step per revealed batch on the batch's users and items).

Objective: next-item softmax over all known items (full softmax is cheap at
catalogue sizes like ML-1M's and has no sampling bias). A user never seen in
training has a zero vector, so it is scored by the item bias alone — popularity.

Shapes: ``B`` events, ``U`` users, ``N`` known items, ``D`` embedding dim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from recsys.batch_users import earlier_same_user
from recsys.rows import grow


@dataclass(frozen=True)
class MFConfig:
    dim: int = 64
    epochs: int = 4
    batch_size: int = 2048
    lr: float = 0.005
    l2: float = 1e-6  # on the embeddings touched by a step
    online_lr: float = 0.0  # 0: static; > 0: SGD on every revealed batch
    seed: int = 0
    progress: bool = False


class MF:
    def __init__(self, cfg: MFConfig = MFConfig()):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.user = torch.zeros(0, cfg.dim)
        self.item = torch.zeros(0, cfg.dim)
        self.bias = torch.zeros(0)
        self.pending = None  # (batch, its gradients) from score_fresh, for update to apply

    def grow_rows(self, n_users: int, n_items: int) -> None:
        self.user = grow(self.user, n_users)
        if n_items > self.item.shape[0]:
            old = self.item.shape[0]
            self.item = grow(self.item, n_items)
            self.item[old:] = 0.01 * torch.randn(self.item.shape[0] - old, self.cfg.dim, generator=self.gen)
        self.bias = grow(self.bias, n_items, fill=float(self.bias.min()) if len(self.bias) else 0.0)

    def fit(self, history) -> None:
        cfg = self.cfg
        U, N = history.n_users_known, history.n_items_known
        torch.manual_seed(cfg.seed)
        user = torch.nn.Parameter(0.01 * torch.randn(U, cfg.dim, generator=self.gen))
        item = torch.nn.Parameter(0.01 * torch.randn(N, cfg.dim, generator=self.gen))
        counts = torch.bincount(torch.from_numpy(history.items), minlength=N).float()
        bias = torch.nn.Parameter(torch.log(counts + 1) - torch.log(counts + 1).mean())
        opt = torch.optim.Adam([user, item, bias], lr=cfg.lr)
        users, items = torch.from_numpy(history.users), torch.from_numpy(history.items)
        per_epoch = -(-len(users) // cfg.batch_size)
        bar = tqdm(total=cfg.epochs * per_epoch, desc="fit mf", unit="step", disable=not cfg.progress, mininterval=1.0)
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(users), generator=self.gen)
            for lo in range(0, len(perm), cfg.batch_size):
                bar.update()
                idx = perm[lo:lo + cfg.batch_size]
                u, i = user[users[idx]], item[items[idx]]
                logits = u @ item.T + bias  # (B, N)
                loss = F.cross_entropy(logits, items[idx]) + cfg.l2 * (u.pow(2).sum() + i.pow(2).sum())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        bar.close()
        self.user, self.item, self.bias = user.detach().clone(), item.detach().clone(), bias.detach().clone()

    # -- the replay's fit cache (offline_eval/fit_cache.py) -----------------------------------
    def fit_key(self) -> str:
        return repr(replace(self.cfg, online_lr=0.0, progress=False))  # mf_static and mf_online fit alike

    def save_fit(self, folder: Path) -> None:
        save_file({"user": self.user, "item": self.item, "bias": self.bias, "generator": self.gen.get_state()},
                  str(folder / "mf.safetensors"))

    def load_fit(self, folder: Path) -> None:
        t = load_file(str(folder / "mf.safetensors"))
        self.user, self.item, self.bias = t["user"], t["item"], t["bias"]
        self.gen.set_state(t["generator"])  # items first seen online draw what a fresh fit would

    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        self.grow_rows(int(users.max()) + 1, n_items)
        return self.user[users] @ self.item[:n_items].T + self.bias[:n_items]  # (B, N)

    def score_fresh(self, batch, n_items: int) -> torch.Tensor:
        """Each event from its user's vector after the online steps of their earlier events in
        the batch (the same per-event gradients ``update`` then applies; items as at the batch start)."""
        users = torch.from_numpy(batch.users)
        scores = self.score(users, n_items)
        if self.cfg.online_lr <= 0:
            return scores
        self.pending = (batch, self._gradients(batch))  # update applies these same gradients
        gu = self.pending[1][0]  # (B, D)
        shift = -self.cfg.online_lr * (earlier_same_user(users).to(gu.dtype) @ gu)  # (B, D)
        return scores + shift @ self.item[:n_items].T

    def update(self, batch) -> None:
        if self.cfg.online_lr <= 0:
            return
        pending, self.pending = self.pending, None
        gu, gi, gb, n_known = pending[1] if pending is not None and pending[0] is batch else self._gradients(batch)
        lr, users = self.cfg.online_lr, torch.from_numpy(batch.users)
        # Sum the per-event user gradients per user (a user may appear several times).
        self.user.index_add_(0, users, -lr * gu)
        self.item[:n_known] -= lr * gi / len(users)
        self.bias[:n_known] -= lr * gb / len(users)

    def _gradients(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Per-event user gradients (B, D), summed item (n, D) and bias (n,) gradients of the
        batch's next-item softmax at the current weights, and n, the items they cover."""
        self.grow_rows(batch.n_users_known, batch.n_items_known)
        users, items = torch.from_numpy(batch.users), torch.from_numpy(batch.items)
        n_known = max(int(items.max()) + 1, batch.n_items_known)
        u, it = self.user[users], self.item[:n_known]
        # The softmax cross-entropy's gradient in closed form (no autograd graph per batch):
        # d loss / d logits = softmax − one-hot.
        g = torch.softmax(u @ it.T + self.bias[:n_known], dim=1)  # (B, N)
        g[torch.arange(len(items)), items] -= 1
        return g @ it, g.T @ u, g.sum(0), n_known


def mf_static(**kw) -> MF:
    return MF(MFConfig(**kw))


def mf_online(**kw) -> MF:
    return MF(MFConfig(**({"online_lr": 0.05} | kw)))


