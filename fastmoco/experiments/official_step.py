"""The official MoCo v1/v2 training step (facebookresearch/moco, main_moco.py + builder.py),
re-written here as the baseline of the step benchmark (bench/test_step.py, `fastmoco
bench`): the same work, done the way that code does it.

    momentum update: a Python loop over parameter pairs, k.mul_(m).add_(q.mul(1 - m)),
                     at the start of the forward
    shuffle BN:      gather all images (concat_all_gather: all_gather into a list, then
                     cat), torch.randperm on the host's generator moved to the GPU,
                     broadcast from rank 0, argsort to undo
    logits:          l_pos (N x 1) and l_neg = q @ queue.clone() (N x K), concatenated,
                     divided by T in place, CrossEntropyLoss against label 0
    enqueue:         concat_all_gather(keys), ptr = int(queue_ptr) (a host sync), a slice
                     write of the (C, K) queue, assert K % batch == 0
    optimizer:       torch.optim.SGD (foreach), lr a Python float, fp32, no AMP
    logging:         loss.item() every step (the AverageMeter of main_moco.py)

The encoders are fastmoco's Encoder (backbone + head), the same networks as the fastmoco
rows, so the benchmark compares the step's machinery, not two different ResNets.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastmoco.models.moco import Encoder


def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """The official gather: a list of world_size buffers, all_gather, cat (a copy)."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.cat([x.clone()], dim=0)
    parts = [torch.ones_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x, async_op=False)
    return torch.cat(parts, dim=0)


class OfficialMoCo(nn.Module):
    def __init__(self, arch: str, *, dim=128, K=65536, m=0.999, T=0.2, mlp_hidden=2048,
                 small_images=False):  # fmt: skip
        super().__init__()
        self.K, self.m, self.T = K, m, T
        enc = dict(dim=dim, mlp_hidden=mlp_hidden, small_images=small_images, bn_splits=1)
        self.encoder_q = Encoder(arch, **enc)
        self.encoder_k = Encoder(arch, **enc)
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            p_k.data.copy_(p_q.data)
            p_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # C x K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            p_k.mul_(self.m).add_(p_q.mul(1.0 - self.m))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = concat_all_gather(keys)
        B = keys.shape[0]
        ptr = int(self.queue_ptr)  # the host sync fastmoco's enqueue removes
        assert self.K % B == 0
        self.queue[:, ptr : ptr + B] = keys.T
        self.queue_ptr[0] = (ptr + B) % self.K

    @torch.no_grad()
    def _shuffled_keys(self, im_k):
        B = im_k.shape[0]
        x_all = concat_all_gather(im_k)
        idx_shuffle = torch.randperm(x_all.shape[0]).to(im_k.device)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(idx_shuffle, src=0)
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
        idx_unshuffle = torch.argsort(idx_shuffle)
        k = F.normalize(self.encoder_k(x_all[idx_shuffle.view(world_size, -1)[rank]]), dim=1)
        k_all = concat_all_gather(k)
        return k_all[idx_unshuffle.view(world_size, -1)[rank]][:B]

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._shuffled_keys(im_k)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1)
        logits /= self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


class OfficialStep:
    """main_moco.py's inner loop body: forward, CE loss, loss.item(), SGD step."""

    def __init__(self, model: OfficialMoCo, *, lr=0.03, momentum=0.9, weight_decay=1e-4):
        self.model = model
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr, momentum=momentum, weight_decay=weight_decay
        )

    def __call__(self, im_q, im_k):
        output, target = self.model(im_q, im_k)
        loss = self.criterion(output, target)
        loss_value = loss.item()  # losses.update(loss.item(), ...) in main_moco.py
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss_value
