"""pyfuse's training loop: mlx-lm's step with what mlx-lm's trainer lacks.

The step is mlx-lm's (``mlx_lm.tuner.trainer.train``): the loss through
``nn.value_and_grad``, one compiled function over the model, optimizer and
MLX random state, gradients summed over ``grad_accumulation_steps``
minibatches and averaged before the update, mlx-lm's gradient checkpointing.
Added here:

* a learning-rate schedule (the optimizer takes mlx-lm's ``build_schedule``);
* checkpoints every ``save_every`` steps that hold everything the run needs
  to continue bit for bit after a kill (:mod:`.checkpoint`): the adapter,
  the optimizer state, the step, the data order, the RNG states, the
  partial gradient sum and the loss reports so far;
* validation in a fixed order (mlx-lm draws a random subset each time,
  which makes the losses of two evaluations incomparable), the best
  validation loss kept, and early stopping after ``early_stop_patience``
  evaluations without improvement.

The batches are mlx-lm's: rows sorted by length, cut into groups of
``batch_size``, each group padded to one plus a multiple of 32 tokens
(at most ``max_seq_length``); each epoch visits the groups in a new
permutation drawn from a NumPy generator seeded with ``seed``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np

__all__ = ["BatchOrder", "LoopArgs", "Objective", "Progress", "evaluate", "run_loop", "sft_objective"]


@dataclass
class LoopArgs:
    iters: int
    batch_size: int
    val_batches: int
    steps_per_report: int
    steps_per_eval: int
    save_every: int
    max_seq_length: int
    grad_checkpoint: bool
    grad_accumulation_steps: int
    clear_cache_threshold: int = 0
    early_stop_patience: int = 0  # 0: never stop early


@dataclass
class Objective:
    """What is minimised: ``loss(model, *batch) -> (loss, weight, *metrics)``
    (``weight``: tokens, or pairs for DPO; metrics are batch means
    reported as the mean over a report window), ``lengths(dataset)`` (the
    sort key of each row) and ``collate(dataset, ids, max_seq_length) ->
    batch``."""

    loss: Callable
    lengths: Callable
    collate: Callable
    metric_names: tuple[str, ...] = ()


def _row(item):
    """A cached mlx-lm dataset item: ``(tokens, completion offset)`` or tokens."""
    return item if isinstance(item, tuple) else (item, 0)


def sft_collate(dataset, ids, max_seq_length: int):
    """mlx-lm's ``iterate_batches`` batch: tokens padded to 1 + a multiple
    of 32 (at most ``max_seq_length``) and ``[offset, length]`` per row."""
    import mlx.core as mx

    rows = [_row(dataset[j]) for j in ids]
    lengths = [len(t) for t, _ in rows]
    width = min(1 + 32 * ((max(lengths) + 31) // 32), max_seq_length)
    arr = np.zeros((len(rows), width), np.int32)
    spans = []
    for j, (tokens, offset) in enumerate(rows):
        n = min(len(tokens), max_seq_length)
        arr[j, :n] = tokens[:n]
        spans.append((offset, n))
    return mx.array(arr), mx.array(spans)


def sft_objective() -> Objective:
    from mlx_lm.tuner.trainer import default_loss

    return Objective(loss=default_loss, lengths=lambda ds: [ds.itemlen(i) for i in range(len(ds))],
                     collate=sft_collate)


class BatchOrder:
    """The groups of row ids (mlx-lm's: sorted by length, ``batch_size``
    each, the remainder dropped) and the order they are visited in, with
    its state (generator, epoch permutation, position) for checkpoints."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        idx = sorted(range(len(lengths)), key=lengths.__getitem__)
        self.groups = [idx[i:i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)]
        self.rng = np.random.RandomState(seed)
        self.perm: list[int] = []
        self.pos = 0

    def next(self) -> list[int]:
        if self.pos >= len(self.perm):
            self.perm, self.pos = self.rng.permutation(len(self.groups)).tolist(), 0
        self.pos += 1
        return self.groups[self.perm[self.pos - 1]]

    def state(self) -> dict:
        name, keys, pos, has_gauss, cached = self.rng.get_state()
        return {"rng": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)], "perm": self.perm,
                "pos": self.pos}

    def restore(self, st: dict) -> None:
        name, keys, pos, has_gauss, cached = st["rng"]
        self.rng.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        self.perm, self.pos = list(st["perm"]), int(st["pos"])


def evaluate(model, dataset, objective: Objective, batch_size: int, num_batches: int,
             max_seq_length: int, parallel=None) -> dict:
    """The weighted mean loss (and metrics) over the first ``num_batches``
    groups (-1: all) of ``dataset`` in its fixed, length-sorted order
    (``parallel``: this rank's share of the groups, the sums over the ranks)."""
    import mlx.core as mx

    order = BatchOrder(objective.lengths(dataset), batch_size, 0)
    groups = order.groups if num_batches == -1 else order.groups[:num_batches]
    if parallel is not None:
        groups = parallel.share(groups)
    model.eval()
    total, weight = mx.array(0.0), mx.array(0.0)
    metrics = [mx.array(0.0) for _ in objective.metric_names]
    for ids in groups:
        loss, w, *ms = objective.loss(model, *objective.collate(dataset, ids, max_seq_length))
        total = total + loss * w
        weight = weight + w
        metrics = [a + m * w for a, m in zip(metrics, ms)]
        mx.eval(total, weight, *metrics)
    if parallel is not None:  # every rank gets the same sums: the same decisions (best, early stop)
        total, weight, *metrics = parallel.sum_over_ranks([total, weight, *metrics])
    w = weight.item()
    out = {"val_loss": total.item() / w}
    out.update({f"val_{n}": m.item() / w for n, m in zip(objective.metric_names, metrics)})
    return out


@dataclass
class Progress:
    """Everything besides tensors that a checkpoint restores: the step,
    the data order, the report window, the reports and the best
    validation loss."""

    iteration: int = 0
    order: dict | None = None
    window: dict = field(default_factory=lambda: {"loss": 0.0, "weight": 0.0, "steps": 0, "metrics": []})
    trained_tokens: float = 0.0
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    best_val: float | None = None
    best_iteration: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


class _Window:
    """Sums of one report window (lazy MLX scalars, as mlx-lm)."""

    def __init__(self, saved: dict, n_metrics: int):
        import mlx.core as mx

        self.loss = mx.array(saved["loss"])
        self.weight = mx.array(saved["weight"])
        self.steps = saved["steps"]
        self.metrics = [mx.array(v) for v in (saved["metrics"] or [0.0] * n_metrics)]
        self.seconds = 0.0

    def add(self, loss, weight, metrics) -> None:
        self.loss = self.loss + loss
        self.weight = self.weight + weight
        self.metrics = [a + m for a, m in zip(self.metrics, metrics)]
        self.steps += 1

    def saved(self) -> dict:
        return {"loss": self.loss.item(), "weight": self.weight.item(), "steps": self.steps,
                "metrics": [m.item() for m in self.metrics]}


def _compiled_step(model, optimizer, loss_fn, grad_accum_steps: int, parallel=None):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    # parallel (pyfuse.distributed.training): this rank's share of the batch, summed over the ranks
    loss_value_and_grad = nn.value_and_grad(model, parallel.weighted_loss(loss_fn) if parallel else loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    def value_and_grad(batch):
        if parallel is None:
            return loss_value_and_grad(model, *batch)
        (lsum, weight, *metric_sums), grad = loss_value_and_grad(model, *batch)
        lvalue, weight, metrics, grad = parallel.reduce(lsum, weight, metric_sums, grad)
        return (lvalue, weight, *metrics), grad

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):
        (lvalue, weight, *metrics), grad = value_and_grad(batch)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if do_update:
            if grad_accum_steps > 1:
                grad = tree_map(lambda x: x / grad_accum_steps, grad)
            optimizer.update(model, grad)
            grad = None
        return lvalue, weight, metrics, grad

    return step, state


def _report(prog: Progress, window: _Window, optimizer, names, it: int, on_report) -> None:
    steps = window.steps
    rec = {"iteration": it, "train_loss": window.loss.item() / steps,
           "learning_rate": optimizer.learning_rate.item()}
    rec.update({n: m.item() / steps for n, m in zip(names, window.metrics)})
    tokens = window.weight.item()
    prog.trained_tokens += tokens
    rec.update({"iterations_per_second": steps / max(window.seconds, 1e-9),
                "tokens_per_second": tokens / max(window.seconds, 1e-9),
                "trained_tokens": int(prog.trained_tokens)})
    prog.train.append(rec)
    if on_report:
        on_report("train", rec)


def _validate(model, prog: Progress, valid_set, objective, args: LoopArgs, it: int, on_report,
              parallel=None) -> bool:
    """Evaluate, track the best; True when the patience is exhausted."""
    rec = {"iteration": it, **evaluate(model, valid_set, objective, args.batch_size, args.val_batches,
                                        args.max_seq_length, parallel)}
    model.train()
    prog.val.append(rec)
    improved = prog.best_val is None or rec["val_loss"] < prog.best_val
    if improved:
        prog.best_val, prog.best_iteration, prog.evals_without_improvement = rec["val_loss"], it, 0
    else:
        prog.evals_without_improvement += 1
    rec["best"] = improved
    if on_report:
        on_report("val", rec)
    return bool(args.early_stop_patience) and prog.evals_without_improvement >= args.early_stop_patience


def run_loop(model, optimizer, train_set, valid_set, objective: Objective, args: LoopArgs, *, seed: int,
             store, progress: Progress | None = None, on_report=None, on_step=None, parallel=None) -> Progress:
    """Train ``model`` (its trainable parameters) for ``args.iters`` steps,
    or from ``progress`` (a restored checkpoint) on. ``store`` saves
    checkpoints and the best weights (:class:`.checkpoint.RunStore`);
    ``on_report(kind, record)`` sees every report, ``on_step(it)`` every
    finished step; ``parallel`` (:mod:`pyfuse.distributed.training`): this
    rank trains on its share of each batch, the gradients summed over the ranks."""
    import mlx.core as mx

    prog = progress or Progress()
    order = BatchOrder(objective.lengths(train_set), args.batch_size, seed)
    if prog.order is not None:
        order.restore(prog.order)
    step, state = _compiled_step(model, optimizer, objective.loss, args.grad_accumulation_steps, parallel)
    grad = store.restored_grad
    window = _Window(prog.window, len(objective.metric_names))
    model.train()
    if valid_set is not None and prog.iteration == 0:
        _validate(model, prog, valid_set, objective, args, 0, on_report, parallel)
        if prog.best_iteration == 0:
            store.save_best(model)
    for it in range(prog.iteration + 1, args.iters + 1):
        tic = time.perf_counter()
        ids = order.next()
        batch = objective.collate(train_set, parallel.share(ids) if parallel else ids, args.max_seq_length)
        with parallel.own_random_key() if parallel else contextlib.nullcontext():  # its own dropout masks
            lvalue, weight, metrics, grad = step(batch, grad, it % args.grad_accumulation_steps == 0)
        window.add(lvalue, weight, metrics)
        mx.eval(state, window.loss, window.weight, window.metrics, grad)
        if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
            mx.clear_cache()
        window.seconds += time.perf_counter() - tic
        if it % args.steps_per_report == 0 or it == args.iters:
            _report(prog, window, optimizer, objective.metric_names, it, on_report)
            window = _Window({"loss": 0.0, "weight": 0.0, "steps": 0, "metrics": []}, len(objective.metric_names))
        stop = False
        if valid_set is not None and (it % args.steps_per_eval == 0 or it == args.iters):
            stop = _validate(model, prog, valid_set, objective, args, it, on_report, parallel)
            if prog.best_iteration == it:
                store.save_best(model)
        prog.iteration = it
        if it % args.save_every == 0 or stop:
            prog.order, prog.window = order.state(), window.saved()
            store.save_checkpoint(model, optimizer, grad, prog)
        if on_step:
            on_step(it)
        if stop:
            prog.stopped_early = True
            break
    return prog
