"""A CPU stand-in for ``torch.cuda.make_graphed_callables``, faithful in the one thing the gradient
tests need: how a graphed callable hands its gradients to autograd.

CUDA graphs do not exist on the CPU, so "replaying" here runs the callable again, eagerly. What is
kept exactly is the buffer ownership of torch/cuda/graphs.py (torch 2.13): the callable's outputs
and the gradients of its inputs and parameters live in static tensors that belong to the graph and
that every replay rewrites; the autograd Function returns ``.detach()``ed views of them. The lines
mirrored, from ``make_graphed_autograd_function``'s ``Graphed``:

    def forward(ctx, *inputs):
        for i in range(len_user_args):
            if static_input_surface[i].data_ptr() != inputs[i].data_ptr():
                static_input_surface[i].copy_(inputs[i])
        fwd_graph.replay()
        return tuple(o.detach() for o in static_outputs)

    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        for g, grad in zip(static_grad_outputs, grads):
            if g is not None:
                if g.data_ptr() != grad.data_ptr():
                    g.copy_(grad)
        bwd_graph.replay()
        return tuple(b.detach() if b is not None else b for b in static_grad_inputs)

and ``functionalized``: ``Graphed.apply(*(tuple(flatten_user_args) + module_params))`` with
``module_params = tuple(c.parameters())``. A returned ``b.detach()`` is a fresh tensor on the
graph's storage, which AccumulateGrad adopts as ``param.grad`` when that is None.
"""

from __future__ import annotations

from typing import Any

import torch


class GraphStandIn:
    """One captured callable (one bucket): static input surface, outputs and input gradients."""

    def __init__(self, func: torch.nn.Module, sample_args: tuple[torch.Tensor, ...]) -> None:
        self.func = func
        self.params = tuple(func.parameters())
        self.user_args = len(sample_args)
        self.surface = (*sample_args, *self.params)  # the graph reads these tensors in place
        self.needs_grad = [t.requires_grad for t in self.surface]
        self.static_outputs: torch.Tensor | None = None
        self.static_grad_output: torch.Tensor | None = None
        self.static_grad_inputs: tuple[torch.Tensor | None, ...] | None = None
        self.recorded: torch.Tensor | None = None  # the replayed forward's autograd graph
        self.replays = 0

    def replay_forward(self) -> None:
        with torch.enable_grad():
            self.recorded = self.func(*self.surface[: self.user_args])
        if self.static_outputs is None:  # "capture": the graph's output memory
            self.static_outputs = torch.empty_like(self.recorded)
        self.static_outputs.copy_(self.recorded.detach())

    def replay_backward(self) -> None:
        assert self.recorded is not None and self.static_grad_output is not None
        wanted = [t for t, needs in zip(self.surface, self.needs_grad, strict=True) if needs]
        grads = iter(torch.autograd.grad(self.recorded, wanted, self.static_grad_output))
        if self.static_grad_inputs is None:  # "capture": the graph's gradient memory
            self.static_grad_inputs = tuple(
                torch.empty_like(t) if needs else None
                for t, needs in zip(self.surface, self.needs_grad, strict=True)
            )
        for buffer in self.static_grad_inputs:
            if buffer is not None:
                buffer.copy_(next(grads))  # what a replay of the backward graph writes
        self.replays += 1
        self.recorded = None

    def __call__(self, *user_args: torch.Tensor) -> torch.Tensor:
        out = _Graphed.apply(self, *user_args, *self.params)
        assert isinstance(out, torch.Tensor)
        return out


class _Graphed(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, graph: GraphStandIn, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.graph = graph
        for i in range(graph.user_args):
            if graph.surface[i].data_ptr() != inputs[i].data_ptr():
                graph.surface[i].copy_(inputs[i])
        graph.replay_forward()
        assert graph.static_outputs is not None
        return graph.static_outputs.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        graph: GraphStandIn = ctx.graph
        if graph.static_grad_output is None:
            graph.static_grad_output = torch.empty_like(grad)
        if graph.static_grad_output.data_ptr() != grad.data_ptr():
            graph.static_grad_output.copy_(grad)
        graph.replay_backward()
        assert graph.static_grad_inputs is not None
        return (None, *(b.detach() if b is not None else b for b in graph.static_grad_inputs))


def make_graphed_stand_in(
    func: torch.nn.Module, sample_args: tuple[torch.Tensor, ...], **_: Any
) -> GraphStandIn:
    """``make_graphed_callables(func, sample_args, num_warmup_iters=…, pool=…)`` on the CPU."""
    return GraphStandIn(func, sample_args)
