"""Static SASRec (Kang & McAuley, 2018): a causal self-attention model over a user's
latest items, trained once on history with a next-item softmax over all items.

At replay it reads each user's latest ``max_len`` items, revealed stream events
included, and its weights never change: it is the "sequence model without online
learning" baseline. Items first seen in the stream are unknown to it; they rank
below every known item, and in a user's sequence they are padding.

Shapes: ``B`` users, ``L`` = ``max_len`` positions (left-padded, latest last),
``N`` items known at fit time, ``D`` embedding dim. Item index ``i`` is token ``i + 1``;
token 0 is padding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from recsys.batch_users import sequences_before, user_positions
from recsys.rows import grow


@dataclass(frozen=True)
class SASRecConfig:
    dim: int = 64
    heads: int = 2
    layers: int = 2
    max_len: int = 50
    dropout: float = 0.2
    epochs: int = 4
    batch_size: int = 128  # sequences per step
    lr: float = 1e-3
    seed: int = 0
    progress: bool = False


class SASRecNet(nn.Module):
    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.items = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        self.positions = nn.Embedding(cfg.max_len, cfg.dim)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, dim_feedforward=cfg.dim, dropout=cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(cfg.max_len), persistent=False)
        nn.init.normal_(self.items.weight, std=cfg.dim ** -0.5)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens → (B, L, D) hidden states; position t sees tokens ≤ t."""
        L = tokens.shape[1]
        pad = (tokens == 0).unsqueeze(-1)
        x = self.items(tokens) * self.items.embedding_dim ** 0.5 + self.positions.weight[-L:]
        x = self.drop(x).masked_fill(pad, 0.0)
        return self.norm(self.encoder(x, mask=self.causal[:L, :L], is_causal=True))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.items.weight[1:].T  # tied input/output item embeddings


def training_windows(users: np.ndarray, items: np.ndarray, max_len: int) -> torch.Tensor:
    """(W, max_len + 1) tokens: every user's history cut into consecutive windows of
    ``max_len + 1`` items (inputs are the first ``max_len``, targets the last), the
    oldest window left-padded, so every event is a target once."""
    order = np.argsort(users, kind="stable")  # by user, time order kept
    u, tok = users[order], items[order] + 1
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    lengths = np.diff(np.r_[starts, len(u)])
    step = max_len
    rows = []
    for s, n in zip(starts, lengths):  # once per user at fit time, not on the replay path
        seq = tok[s:s + n]
        for end in range(n, 1, -step):  # windows end at the latest item and walk back
            w = seq[max(0, end - max_len - 1):end]
            rows.append(np.pad(w, (max_len + 1 - len(w), 0)))
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, max_len + 1, dtype=torch.int64)


class SASRecStatic:
    def __init__(self, cfg: SASRecConfig = SASRecConfig()):
        self.cfg = cfg
        self.net: SASRecNet | None = None
        self.n_items = 0
        self.seq = torch.zeros(0, cfg.max_len, dtype=torch.int64)  # (U, L) each user's latest tokens

    def fit(self, history) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.n_items = history.n_items_known
        self.net = SASRecNet(self.n_items, cfg)
        windows = training_windows(history.users, history.items, cfg.max_len)
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        gen = torch.Generator().manual_seed(cfg.seed)
        self.net.train()
        per_epoch = -(-len(windows) // cfg.batch_size)
        bar = tqdm(total=cfg.epochs * per_epoch, desc="fit sasrec", unit="step", disable=not cfg.progress,
                   mininterval=1.0)
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(windows), generator=gen).split(cfg.batch_size):
                bar.update()
                w = windows[idx]
                inputs, targets = w[:, :-1], w[:, 1:]
                logits = self.net.logits(self.net(inputs))  # (B, L, N)
                # Padding targets carry no loss; token t is item t - 1.
                loss = F.cross_entropy(logits.flatten(0, 1), (targets - 1).flatten(), ignore_index=-1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        bar.close()
        self.net.eval()
        self.seq = torch.zeros(0, cfg.max_len, dtype=torch.int64)
        self.update(history)

    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        self.seq = grow(self.seq, int(users.max()) + 1)
        # A batch holds few distinct users (sessions come in bursts): encode each once.
        distinct, row = torch.unique(users, return_inverse=True)
        return self._scores(self.seq[distinct], n_items)[row]

    def score_fresh(self, batch, n_items: int) -> torch.Tensor:
        """Each event from the sequence up to it: its user's earlier events of the batch included."""
        users = torch.from_numpy(batch.users)
        self.seq = grow(self.seq, int(users.max()) + 1)
        return self._scores(sequences_before(self.seq[users], users, self._tokens(batch.items)), n_items)

    def _scores(self, seqs: torch.Tensor, n_items: int) -> torch.Tensor:
        """(B, L) token sequences → (B, n_items) scores of the item after each."""
        with torch.inference_mode():
            hidden = self.net(seqs)[:, -1]  # the state after the latest item
            known = self.net.logits(hidden)[:, :n_items]  # (B, min(N, n_items))
        if n_items <= known.shape[1]:
            return known.clone()  # out of inference mode: the replay masks it in place
        # Items first seen online: below every known item (the static model cannot place them).
        floor = known.min(dim=1, keepdim=True).values - 1
        return torch.cat([known, floor.expand(-1, n_items - known.shape[1])], dim=1)

    def _tokens(self, items: np.ndarray) -> torch.Tensor:
        """Item indices → tokens; items unknown at fit time are padding."""
        return torch.from_numpy(np.where(items < self.n_items, items + 1, 0))

    def update(self, batch) -> None:
        """Append the revealed events to their users' sequences, in log order, for all the
        batch's users at once (the pattern of the nested model's ``recent`` items)."""
        if batch.n_events == 0:
            return
        L = self.cfg.max_len
        users = torch.from_numpy(batch.users)
        tokens = self._tokens(batch.items)
        self.seq = grow(self.seq, int(users.max()) + 1)
        uniq, row, pos, counts = user_positions(users)
        # Only a user's latest L events can survive (at fit: the history's older ones are skipped).
        skip = (counts - L).clamp(min=0)
        keep = pos >= skip[row]
        new = torch.zeros(len(uniq), L, dtype=torch.int64)  # (U, L) each user's new tokens, oldest first
        new[row[keep], pos[keep] - skip[row[keep]]] = tokens[keep]
        n_new = counts - skip
        window = n_new.unsqueeze(1) + torch.arange(L)  # the latest L of old + new
        self.seq[uniq] = torch.cat([self.seq[uniq], new], dim=1).gather(1, window)

    # -- the replay's fit cache (offline_eval/fit_cache.py) -----------------------------------
    def fit_key(self) -> str:
        return repr(replace(self.cfg, progress=False))  # showing progress fits alike

    def save_fit(self, folder: Path) -> None:
        save_file(self.net.state_dict() | {"sequences": self.seq}, str(folder / "sasrec.safetensors"),
                  metadata={"config": json.dumps(asdict(self.cfg))})

    def load_fit(self, folder: Path) -> None:
        tensors = load_file(str(folder / "sasrec.safetensors"))
        self.seq = tensors.pop("sequences")
        self.n_items = tensors["items.weight"].shape[0] - 1
        self.net = SASRecNet(self.n_items, self.cfg)
        self.net.load_state_dict(tensors)
        self.net.eval()
