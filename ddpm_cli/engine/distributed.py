"""torch.distributed plumbing for `torchrun` (or `--gpus N`): one process per GPU, gradients averaged by DDP or by
one flat all-reduce (CUDA-graph steps), sampled images gathered to rank 0, which does the I/O. With no torchrun
environment it is a single process and every method is a cheap no-op."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ddpm_cli.errors import DeviceError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    _flat: "FlatGrads | None" = None
    _cpu_group: "dist.ProcessGroup | None" = None

    @classmethod
    def from_env(cls, device_name: str = "auto", option: str = "train.device") -> "DistInfo":
        """This process's rank under torchrun (a single process otherwise), on the device `device_name` asks for
        (`option` names where it came from, for the messages): auto = this rank's GPU where there are GPUs, else
        the CPU; cpu or cuda as asked, checked to be here; a GPU's index is the rank's own, not the user's."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        from ddpm_cli.engine.build import resolve_device

        asked = resolve_device(device_name, option)  # a device that is not here is refused on every rank alike
        if asked.type not in ("cuda", "cpu") or asked.index is not None:
            fix = f"use {option} cuda, cpu or auto" if option.startswith("-") else f"set {option}=cuda, cpu or auto"
            raise DeviceError(f"{option} {device_name} under torchrun (--gpus): each rank runs on its own GPU, or "
                              f"on the CPU; {fix}")
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if asked.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            # torch.distributed.nn's functions take `group=group.WORLD` as a default argument: imported after the
            # default group is made (torch's compiler imports it), they would hold that group past close() (there).
            import torch.distributed.nn as _  # noqa: F401

            dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        return cls(rank, world, local, device)

    def wrap(self, model: torch.nn.Module, grad_sync: str = "ddp") -> torch.nn.Module:
        """DDP around `model`, or (grad_sync == "flat") the model itself with rank 0's weights broadcast: the loop
        then calls all_reduce_grads() after each backward."""
        if self.world == 1:
            return model
        if grad_sync == "flat":
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(t, src=0)
            return model
        from torch.nn.parallel import DistributedDataParallel

        import inspect

        ids = [self.device.index] if self.device.type == "cuda" else None
        # no buffer sync before each forward: the UNet's buffers are constants (dense_grad's 1), the same on every
        # rank, which DDP would otherwise send from rank 0 every step. Newer torch names it forward_sync_buffers
        # (and warns at broadcast_buffers); it still syncs them once at the start, which changes nothing here.
        takes = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in takes else {"broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, static_graph=True,
                                       **no_sync)

    def all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Average the gradients of `params` over the ranks with one all-reduce of a flat buffer; afterwards each
        `p.grad` is a view into that buffer with p's own layout."""
        if self.world == 1:
            return
        if self._flat is None:
            self._flat = FlatGrads(params)
        flat = self._flat
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        torch._foreach_copy_(flat.views, grads)
        for buf in flat.buffers:
            if dist.get_backend() == "nccl":
                dist.all_reduce(buf, op=dist.ReduceOp.AVG)
            else:  # gloo has no AVG
                dist.all_reduce(buf.div_(self.world))
        for p, v in zip(params, flat.views):
            p.grad = v

    def gather_batches(self, kept: list[tuple[int, torch.Tensor]], n: int, batch_size: int,
                       item_shape: tuple[int, ...]) -> torch.Tensor | None:
        """The `n` uint8 images of all ranks, in index order, on rank 0 (None elsewhere). Batch b (images
        b * batch_size ...) was made by rank b % world; `kept` holds this rank's (first index, images) pairs."""
        if self.world == 1:
            return torch.cat([t for _, t in sorted(kept, key=lambda kv: kv[0])])
        num_batches = -(-n // batch_size)
        out = torch.empty(n, *item_shape, dtype=torch.uint8) if self.rank == 0 else None
        mine = {start // batch_size: images for start, images in kept}
        buf = torch.zeros(batch_size, *item_shape, dtype=torch.uint8, device=self.device)
        flat = torch.empty(self.world * batch_size, *item_shape, dtype=torch.uint8, device=self.device)
        got = flat.view(self.world, *buf.shape)
        for first in range(0, num_batches, self.world):  # round by round: one batch per rank on the device
            b = first + self.rank
            if b in mine:
                buf[:mine[b].shape[0]] = mine[b].to(self.device)
            dist.all_gather_into_tensor(flat, buf)
            if out is not None:
                for r in range(min(self.world, num_batches - first)):
                    lo = (first + r) * batch_size
                    out[lo:min(n, lo + batch_size)] = got[r, :min(n, lo + batch_size) - lo].cpu()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no rank tears the group down under a queued collective
        return out

    def agree(self, flag: int, step: int, every: int = 10) -> int:
        """The largest `flag` over all ranks (checked every `every` steps, 0 in between); `flag` alone when single.
        The ranks' CPUs meet; their GPUs keep working."""
        if self.world == 1:
            return flag
        if step % every:
            return 0
        if self._cpu_group is None:
            # Host-side flags travel over gloo between the CPUs: the same exchange over NCCL would make each
            # rank's CPU wait for its GPU to drain the queued steps, and the GPU would idle until it refilled.
            # Made on first use (every rank's first check is at the same step), so sampling and evaluation
            # never open gloo sockets; across nodes gloo may need GLOO_SOCKET_IFNAME (README).
            self._cpu_group = dist.new_group(backend="gloo")
        t = torch.tensor([flag], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._cpu_group)
        return int(t.item())

    def broadcast_path(self, path: Path) -> Path:
        if self.world == 1:
            return path
        # A fixed-size byte tensor rather than broadcast_object_list, which pickles.
        buf = torch.zeros(4096, dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            raw = str(path).encode()[:4096]
            buf[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        dist.broadcast(buf, src=0)
        return Path(bytes(buf.cpu().tolist()).rstrip(b"\0").decode())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def finish_together(self) -> None:
        """Wait until every rank has finished its run (ranks in step only: the end of a run, not an error path), so
        that no rank tears its groups down while another still uses them. (The abort at exit once blamed on that,
        "terminate called without an active exception", was a gloo worker releasing a Python tensor during the
        interpreter's exit: close() frees the group first.)"""
        if self.world > 1:
            dist.barrier(group=self._cpu_group)  # the host-side gloo group when made; else the default group

    def average(self, t: torch.Tensor) -> torch.Tensor:
        """`t` averaged over the ranks, in place (the same value on every rank afterwards)."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            if self.device.type == "cuda":  # no collective still queued when the group goes
                torch.cuda.synchronize(self.device)
            dist.destroy_process_group()
        # A gloo group's worker threads live until the group itself is freed, and one may still hold the last
        # collective's work, whose tensor is a Python object (agree's flag): left to the interpreter's exit, that
        # thread releases it without the interpreter and the process aborts ("terminate called without an active
        # exception", SIGABRT, after its run had ended). Freed here (where no error's traceback still holds it),
        # a group joins its threads first; the default group is freed by destroy_process_group (from_env).
        self._cpu_group = None


class FlatGrads:
    """One buffer per dtype whose slices view each parameter's gradient with the parameter's own strides (also
    channels-last), so a gradient sync is a fused copy and one all-reduce, whatever the number of tensors."""

    def __init__(self, params: list[torch.Tensor]):
        sizes: dict[torch.dtype, int] = {}
        for p in params:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        by_dtype = {dt: torch.empty(n, dtype=dt, device=params[0].device) for dt, n in sizes.items()}
        self.buffers = list(by_dtype.values())
        offsets = dict.fromkeys(sizes, 0)
        self.views = []
        for p in params:
            span = 1 + sum((n - 1) * st for n, st in zip(p.shape, p.stride()))
            stride = p.stride() if span == p.numel() else torch.empty(p.shape, device="meta").stride()  # dense only
            self.views.append(by_dtype[p.dtype].as_strided(p.shape, stride, offsets[p.dtype]))
            offsets[p.dtype] += p.numel()
