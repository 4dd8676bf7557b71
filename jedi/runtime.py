"""Running a :class:`jedi.JeDiUNet` step as one CUDA graph replay.

A denoising loop calls the UNet with the same shapes at every step; capturing the forward once and replaying it
removes the per-kernel launch cost (hundreds of small kernels per SD step). The kernels of ``jedi_kernels`` skip
their data-dependent checks while a graph is being captured, so the whole forward captures.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["CUDAGraphRunner", "GraphedUNet"]


class CUDAGraphRunner:
    """Capture ``unet(**example_inputs)`` (no grad) into a CUDA graph and replay it with new input values.

    Args:
        unet: a JeDiUNet (any module called with keyword inputs) whose parameters live on a CUDA device.
        example_inputs: the keyword arguments of one forward, e.g. ``dict(x_t=..., timesteps=..., context=...,
            x0=..., ng_mask=..., set_size=2, set_mask=None)``. Tensors (on the UNet's device) become static input
            buffers of the same shape, dtype and strides; other values (``set_size``, ``set_mask=None``) are frozen
            into the graph.
        warmup: eager forwards on a side stream before capture (lets Triton compile and cuBLAS/cuDNN pick kernels).
        clone: return a fresh copy of the output on every call instead of the static output buffer.
        pool: optional CUDA graph memory pool handle (``torch.cuda.graph_pool_handle()``) to share with other graphs.

    ``__call__(**inputs)`` copies every tensor input into its static buffer, replays the graph and returns the static
    output tensor (N, C, h, w), which the NEXT call overwrites: clone it (or build with ``clone=True``) to keep it.
    A call must pass the same keys; tensors must have the captured shapes and dtypes, and non-tensor values must equal
    the captured ones (else ValueError). The graph reads the UNet's parameters in place: updating their values
    (``load_unet_weights``, an optimizer step) is seen by the next replay, re-allocating them is not. A graph
    captured inside ``JeDiUNet.frozen_weights()`` reads the weight-derived tensors the scope keeps: replayed inside a
    scope it uses them as they are (the scope refreshed them on entry), outside one it refreshes them first.

    Raises:
        RuntimeError: at construction when CUDA is unavailable or the UNet is not on a CUDA device. There is no
            silent CPU fallback: a CUDA graph's point is speed, and a runner that quietly ran eager would hide that.
            On the CPU call the UNet directly (or wrap it in ``torch.compile``).
    """

    def __init__(self, unet: nn.Module, example_inputs: dict, *, warmup: int = 3, clone: bool = False, pool=None):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphRunner needs CUDA (torch.cuda.is_available() is False); on the CPU call the "
                               "UNet directly")
        param = next(unet.parameters())
        if param.device.type != "cuda":
            raise RuntimeError(f"CUDAGraphRunner needs the UNet on a CUDA device, its parameters are on {param.device}")
        self.unet, self.clone, self.device = unet, clone, param.device
        self.static: dict = {}
        for k, v in example_inputs.items():
            if isinstance(v, torch.Tensor):
                if v.device != self.device:
                    raise ValueError(f"example_inputs[{k!r}] is on device {v.device}, the UNet on device "
                                     f"{self.device}: move it there")
                self.static[k] = v.detach().clone()  # keeps v's strides (channels-last stays channels-last)
            else:
                self.static[k] = v

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(max(warmup, 1)):
                unet(**self.static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        derived = getattr(unet, "derived_weights", None)
        # captured inside JeDiUNet.frozen_weights(): the graph reads the scope's stored weight-derived tensors
        self.frozen_capture = derived is not None and derived.active
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool):
            self.output = unet(**self.static)

    def __call__(self, **inputs) -> torch.Tensor:
        """Copy ``inputs`` into the static buffers, replay, return the (static, or cloned) output."""
        if inputs.keys() != self.static.keys():
            raise ValueError(f"inputs must have the captured keys {sorted(self.static)}, got {sorted(inputs)}")
        for k, v in inputs.items():
            s = self.static[k]
            if isinstance(s, torch.Tensor):
                if not isinstance(v, torch.Tensor) or v.shape != s.shape or v.dtype != s.dtype:
                    got = (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else type(v)
                    raise ValueError(f"{k} must be a tensor of the captured shape {tuple(s.shape)} and dtype "
                                     f"{s.dtype}, got {got}")
                s.copy_(v)
            elif not (v is s or v == s):
                raise ValueError(f"{k}={v!r} differs from the captured value {s!r}: capture another runner")
        refresh_derived(self.unet, self.frozen_capture)
        self.graph.replay()
        return self.output.clone() if self.clone else self.output


def refresh_derived(unet: nn.Module, frozen_capture: bool) -> bool:
    """Before a replay: a graph captured inside ``JeDiUNet.frozen_weights()`` reads the tensors the scope derived
    from the weights; replayed outside any scope, bring them up to date first (what an unfrozen forward recomputes
    anyway), so that weight updates are seen by the next replay. Returns whether it refreshed."""
    derived = getattr(unet, "derived_weights", None)
    if frozen_capture and derived is not None and not derived.active:
        derived.refresh()
        return True
    return False


def _uses_channels_last(unet: nn.Module) -> bool:
    """Whether the UNet's first 4-D parameter (conv_in's weight) is stored channels-last."""
    w = next((p for p in unet.parameters() if p.dim() == 4), None)
    return w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)


class GraphedUNet:
    """A UNet that replays CUDA graphs: call it as the UNet (``graphed(x_t, timesteps, context, **kw) -> eps``) in a
    sampling loop; the first call with a new signature captures a :class:`CUDAGraphRunner`, later calls replay it.

    A signature is the shape, dtype and device of every tensor argument plus the values of the others (``set_size``,
    ``set_mask=None``); a Python-number ``timesteps`` is turned into a 0-d tensor first, so changing it replays the
    same graph. Inputs are copied into the graph's static buffers (any strides; the buffers are channels-last when the
    UNet is), so callers pass fresh tensors as they would to the UNet. Every call returns a fresh output tensor: a
    multistep sampler keeps earlier steps' eps.

    Args:
        unet: a JeDiUNet on a CUDA device, in eval mode (no grad is recorded).
        max_graphs: graphs kept at once; capturing one more drops the oldest (each holds its own activation memory).
        warmup: eager forwards before each capture (:class:`CUDAGraphRunner`).

    Raises:
        RuntimeError: at construction, without CUDA or with the UNet off the GPU (see :class:`CUDAGraphRunner`).
        ValueError: ``max_graphs < 1``.

    The graphs read the UNet's parameters in place: loading new weights into them is seen by the next replay; moving
    or re-allocating the parameters (``.to(...)``) is not, call :meth:`reset` after that. Inside
    ``JeDiUNet.frozen_weights()`` (the sampling loop's scope) the tensors derived from the weights are made once per
    scope, not per step; outside one they are refreshed before every replay.
    """

    def __init__(self, unet: nn.Module, *, max_graphs: int = 4, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedUNet needs CUDA (torch.cuda.is_available() is False); on the CPU call the UNet "
                               "directly")
        if next(unet.parameters()).device.type != "cuda":
            raise RuntimeError(f"GraphedUNet needs the UNet on a CUDA device, its parameters are on "
                               f"{next(unet.parameters()).device}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.unet, self.max_graphs, self.warmup = unet, max_graphs, warmup
        self.runners: dict = {}  # signature -> CUDAGraphRunner, oldest first
        self.captures = 0

    def reset(self) -> None:
        """Drop every captured graph (and its memory); the next call captures again."""
        self.runners.clear()

    @staticmethod
    def _signature(kwargs: dict) -> tuple:
        sig = []
        for k in sorted(kwargs):
            v = kwargs[k]
            sig.append((k, (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else ("value", v)))
        return tuple(sig)

    def __call__(self, x_t, timesteps, context, **kwargs) -> torch.Tensor:
        """``unet(x_t, timesteps, context, **kwargs)`` by graph replay (capturing first for a new signature).

        Raises:
            ValueError: a non-tensor argument that is not hashable, or (from :class:`CUDAGraphRunner`) a tensor on
                another device than the UNet.
        """
        device = next(self.unet.parameters()).device
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps, device=device)
        inputs = dict(x_t=x_t, timesteps=timesteps, context=context, **kwargs)
        try:
            sig = self._signature(inputs)
            hash(sig)
        except TypeError as e:  # an unhashable non-tensor argument
            raise ValueError(f"GraphedUNet arguments must be tensors or hashable values: {e}") from None
        runner = self.runners.get(sig)
        if runner is None:
            fmt = torch.channels_last if _uses_channels_last(self.unet) else torch.contiguous_format
            example = {k: (v.contiguous(memory_format=fmt) if isinstance(v, torch.Tensor) and v.dim() == 4 else v)
                       for k, v in inputs.items()}
            if len(self.runners) >= self.max_graphs:
                self.runners.pop(next(iter(self.runners)))
            runner = self.runners[sig] = CUDAGraphRunner(self.unet, example, warmup=self.warmup, clone=True)
            self.captures += 1
        return runner(**inputs)
