"""Composition of flow blocks, with the frozen-inference fast path."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from posepriors.flows import _numpy_spline
from posepriors.flows.core import _Block, _check_context, _check_input, _full_logdet, _LogDet, standard_normal_log_prob
from posepriors.flows.couplings import RQSplineCoupling, _Coupling
from posepriors.flows.linear import ActNorm, LULinear, Permutation
from posepriors.grouped import GroupedLinear
from posepriors.utils import in_transform, recorded_vjp, storage_key, to_float64

__all__ = ["FlowSequence", "ensemble_log_prob"]

_Step = Callable[..., tuple[Tensor, _LogDet]]

_LINEAR_BLOCKS = (ActNorm, LULinear, Permutation)


class _FoldedAffine:
    """A run of linear blocks as one precomputed map ``z = x @ A + c`` (or its inverse), for frozen inference."""

    def __init__(self, matrix: Tensor, offset: Tensor, logdet: Tensor) -> None:
        self.matrix, self.offset, self.logdet = matrix, offset, logdet  # (G, D, D), (G, D), (G,)
        self.single = matrix.shape[0] == 1
        if self.single:  # one group: the 2-D factors of a plain GEMM, taken once
            self.matrix_2d, self.offset_2d = matrix[0], offset[0]

    @classmethod
    def from_blocks(cls, blocks: list[nn.Module], inverse: bool, dtype: torch.dtype) -> _FoldedAffine:
        """Compose the blocks' affine maps in float64 (on the CPU for MPS) and cast to ``dtype`` on the blocks'
        device; the inverse map when ``inverse``."""
        matrix = offset = logdet = None
        for block in blocks:
            a, c, ld = block._affine()
            device = a.device
            a, c, ld = (to_float64(t.detach()) for t in (a, c, ld))
            if matrix is None:
                matrix, offset, logdet = a, c, ld
            else:
                matrix = matrix @ a
                offset = (offset.unsqueeze(-2) @ a).squeeze(-2) + c
                logdet = logdet + ld
        if inverse:  # x = (z - c) A^-1
            matrix = torch.linalg.inv(matrix)
            offset = -(offset.unsqueeze(-2) @ matrix).squeeze(-2)
            logdet = -logdet
        groups = max(matrix.shape[0], offset.shape[0])
        matrix = matrix.expand(groups, -1, -1)
        offset = offset.expand(groups, -1)
        matrix, offset, logdet = (t.to(dtype).to(device).contiguous() for t in (matrix, offset, logdet))
        return cls(matrix, offset, logdet.expand(groups))

    def __call__(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.single:  # one group: a plain GEMM
            return torch.addmm(self.offset_2d, x.squeeze(1), self.matrix_2d).unsqueeze(1), self.logdet
        z = torch.baddbmm(self.offset.unsqueeze(1), x.transpose(0, 1), self.matrix)
        return z.transpose(0, 1), self.logdet


class FlowSequence(nn.Module):
    """A composition of blocks: ``forward`` runs them in order (data -> latent) and sums their log-determinants,
    ``inverse`` runs their inverses in reverse order.

    The input (and context) shapes are checked once here; the blocks then run unchecked.

    Args:
        blocks: The blocks (:class:`ActNorm`, :class:`LULinear`, :class:`Permutation`, the couplings, or any module
            with ``forward``/``inverse`` returning ``(tensor, logabsdet (B, G))``).
        groups: Number of groups G.
        dim: Dimension per group D.
    """

    def __init__(self, blocks: Iterable[nn.Module], groups: int, dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.groups, self.dim = groups, dim
        self.context_features = max((getattr(b, "context_features", 0) for b in self.blocks), default=0)
        # frozen inference runs batches larger than this in chunks of about 2^20 hidden activations (see _run)
        hidden = [b.conditioner._linears[0].out_features for b in self.blocks if isinstance(b, _Coupling)]
        widest = max(hidden, default=1)
        self._chunk_rows = max(64, 2**20 // (groups * widest))
        # inference cache of folded linear blocks, {inverse: (key, steps, reference steps)}; see _frozen_steps
        self._folded: dict[bool, tuple[tuple[tuple[int, int], ...], list[_Step], list[_Step]]] = {}
        self._compiled: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]] | None = None
        # the fused log-density-and-gradient path: torch.compile options when on, and the compiled graphs by input
        # signature, {key: (parameter key, function)}; see compile_frozen(gradient=True)
        self._fused_options: dict[str, object] | None = None
        self._fused: dict[tuple[object, ...], tuple[tuple[object, ...], Callable[..., tuple[Tensor, ...]]]] = {}
        # frozen copies of group subsets, {group indices: (parameter key, flow)}; see run_groups
        self._subsets: dict[tuple[int, ...], tuple[tuple[object, ...], FlowSequence]] = {}

    def _clear_caches(self) -> None:
        """Forget the maps derived from the weights (folded layers, NumPy plans, compiled graphs, frozen subsets);
        see :meth:`posepriors.priors.PosePrior.clear_caches`."""
        self._folded.clear()
        self._fused.clear()
        self._subsets.clear()
        self.__dict__.pop("_numpy_cache", None)

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        _check_input(x, self.groups, self.dim)
        _check_context(context, x, self.context_features)

    @staticmethod
    def _steps(blocks: Iterable[nn.Module], inverse: bool) -> list[_Step]:
        out = []
        for block in blocks:
            if isinstance(block, _Block):
                out.append(block._inverse if inverse else block._forward)
            else:
                out.append(block.inverse if inverse else block)
        return out

    def _parameter_tuple(self) -> tuple[nn.Parameter, ...]:
        """The flow's parameters, listed once: walking the module tree on every call of a fitting step costs more
        than a single pose's arithmetic. The list is rebuilt after :meth:`train`, :meth:`eval`, device or dtype
        moves and ``load_state_dict`` (which may assign new parameters); a parameter's ``requires_grad``, values and
        version are read live."""
        params = self.__dict__.get("_parameter_cache")
        if params is None:
            params = self.__dict__["_parameter_cache"] = tuple(self.parameters())
        return params

    def train(self, mode: bool = True) -> FlowSequence:
        self.__dict__.pop("_parameter_cache", None)
        return super().train(mode)

    def _apply(self, fn: Callable[..., object], recurse: bool = True) -> FlowSequence:
        self.__dict__.pop("_parameter_cache", None)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self.__dict__.pop("_parameter_cache", None)
        super()._load_from_state_dict(*args, **kwargs)

    def _frozen(self) -> bool:
        """Eval mode, and no gradient can reach the parameters (none requires grad, or grad mode is off), outside
        ``torch.func`` transforms (the frozen couplings' autograd functions have no functorch rules; under ``vmap``
        or ``grad`` the blocks run one by one)."""
        if self.training or in_transform():
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self._parameter_tuple()))

    def _frozen_steps(self, inverse: bool) -> list[_Step] | None:
        """The steps with every run of linear blocks (ActNorm, LU, permutations) folded into one affine map.

        Only for inference: in eval mode, and when no gradient can reach the flow's parameters (none requires
        grad, or grad mode is off). The couplings then run their frozen forward (or inverse), one autograd node per
        layer with a written-out backward when the input needs a gradient (see ``_Coupling._frozen_forward`` and
        ``_frozen_inverse``). The folded maps
        are computed once (in float64) and cached, keyed by the parameters' storage and version counters, so an
        in-place update, ``load_state_dict`` or ``.to()`` rebuilds them. Returns None when the flow
        must run block by block. A small CPU batch runs these steps in NumPy instead (:meth:`_numpy_plan`).
        """
        if not self._frozen():
            return None
        linear = [b for b in self.blocks if isinstance(b, _LINEAR_BLOCKS)]
        if not linear:
            return None
        params = [p for b in linear for p in b._parameters.values()]  # leaf blocks: no recursion needed
        key = storage_key(params)
        if key is None:  # inference tensors: nothing cached, the blocks run one by one
            return None
        cached = self._folded.get(inverse)
        if cached is not None and cached[0] == key:
            return cached[1]
        dtype = next((p.dtype for p in self._parameter_tuple() if p.is_floating_point()), torch.get_default_dtype())
        # plain tensors even inside inference mode: a later call may record a graph through them
        with torch.inference_mode(False), torch.no_grad():
            forward_steps: list[_Step] = []
            reference_steps: list[_Step] = []  # the couplings as recorded ops: what torch.compile traces
            run: list[nn.Module] = []
            for block in self.blocks:
                if isinstance(block, _LINEAR_BLOCKS):
                    run.append(block)
                    continue
                if run:
                    folded = _FoldedAffine.from_blocks(run, inverse, dtype)
                    forward_steps.append(folded)
                    reference_steps.append(folded)
                    run = []
                (step,) = self._steps([block], inverse)
                reference_steps.append(step)
                if isinstance(block, _Coupling):  # one autograd node per layer when fitting
                    step = block._frozen_inverse if inverse else block._frozen_forward
                forward_steps.append(step)
            if run:
                folded = _FoldedAffine.from_blocks(run, inverse, dtype)
                forward_steps.append(folded)
                reference_steps.append(folded)
        if inverse:
            forward_steps, reference_steps = forward_steps[::-1], reference_steps[::-1]
        self._folded[inverse] = (key, forward_steps, reference_steps)
        return forward_steps

    def compile_frozen(self, enabled: bool = True, *, gradient: bool = False, **options: object) -> None:
        """Opt in to running frozen inference in the data-to-latent direction through :func:`torch.compile`.

        Applies where :meth:`_frozen_steps` does (eval mode, no parameter needs a gradient): the folded linear
        maps and the couplings' recorded ops are traced once per input shape and dtype (``dynamic=False``), so
        TorchInductor fuses each coupling's element-wise work and AOTAutograd compiles the backward. The first
        call of every shape pays the compilation (tens of seconds on a CPU, less with a warm cache); new weights
        (``load_state_dict``, an in-place update) recompile. Training and the inverse direction run eagerly.

        With ``gradient=True``, a :meth:`log_prob` whose input (or context) needs a gradient, as in a fitting step,
        instead runs one compiled graph that returns the log-density *and* its input gradient (the forward and the
        couplings' written-out backward traced together with :func:`torch.fx.experimental.proxy_tensor.make_fx`):
        one call per step, and the backward pass is a multiplication. Its compilation takes longer (minutes on 2
        CPU cores for the shipped ``global_flow``); ``docs/benchmarks.md`` has the figures.

        Args:
            enabled: ``False`` goes back to eager.
            gradient: Also compile the log-density and its gradient as one graph (see above).
            options: Passed on to :func:`torch.compile` (e.g. ``mode="max-autotune-no-cudagraphs"``, or
                ``options={"cpp_wrapper": True}``, which cuts the per-call overhead of the many small kernels of a
                single pose).
        """
        self._compiled = torch.compile(self._run_reference, dynamic=False, **options) if enabled else None
        self._fused_options = dict(options) if enabled and gradient else None
        self._fused.clear()

    def _fused_function(
        self, steps: list[_Step], x: Tensor, context: Tensor | None
    ) -> Callable[..., tuple[Tensor, ...]]:
        """The compiled ``(x, context) -> (log_prob, d log_prob / dx[, d log_prob / d context])`` of this input
        signature, traced from the frozen ``steps`` (:meth:`_frozen_steps`: the graph holds their folded maps) and
        compiled on first use; rebuilt when the parameters change."""
        signature = (x.shape, x.dtype, x.device, None if context is None else (context.shape, context.dtype))
        params = storage_key(self._parameter_tuple())
        cached = self._fused.get(signature)
        if cached is not None and params is not None and cached[0] == params:
            return cached[1]
        from torch.fx.experimental.proxy_tensor import make_fx  # only when tracing: it is not needed at import

        def value_and_grad(x: Tensor, context: Tensor | None) -> tuple[Tensor, ...]:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                inputs = [x]
                if context is not None:
                    context = context.detach().requires_grad_(True)
                    inputs.append(context)
                z, logdet = self._run_steps(steps, x, context)
                value = standard_normal_log_prob(z) + logdet
                grads = torch.autograd.grad(value.sum(), inputs)
            return (value.detach(), *grads)

        with torch.no_grad():
            graph = make_fx(value_and_grad)(x.detach(), None if context is None else context.detach())
        function = torch.compile(graph, dynamic=False, fullgraph=True, **self._fused_options)
        if len(self._fused) >= 8:  # a few batch shapes at a time; drop the oldest beyond that
            self._fused.pop(next(iter(self._fused)))
        self._fused[signature] = (params, function)
        return function

    def _run_reference(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The cached frozen forward steps, couplings as recorded ops (see :meth:`compile_frozen`)."""
        return self._run_steps(self._folded[False][2], x, context)

    def _numpy_plan(self, x: Tensor, context: Tensor | None) -> _numpy_spline.Plan | None:
        """The frozen forward steps (:meth:`_frozen_steps`, already run) as arrays for :mod:`._numpy_spline`, when
        ``x`` is a small float CPU batch (at most ``NUMPY_MAX_ELEMENTS`` entries) in the flow's dtype and every
        step has a NumPy kernel; else None. Cached, and rebuilt when a parameter changes."""
        if x.numel() > NUMPY_MAX_ELEMENTS or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            return None
        if context is not None and (context.dtype != x.dtype or context.device != x.device):
            return None
        steps = self._folded[False][1]
        key = (id(steps), x.dtype, storage_key(self._parameter_tuple()))
        if key[2] is None:
            return None
        cached = self.__dict__.get("_numpy_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        plan: _numpy_spline.Plan | None = _numpy_spline.Plan()
        for step in steps:
            coupling = getattr(step, "__self__", None)
            if isinstance(step, _FoldedAffine) and step.matrix.dtype == x.dtype and step.matrix.device == x.device:
                plan.append(_numpy_spline.affine_arrays(step))
            elif isinstance(coupling, RQSplineCoupling) and _numpy_spline.supports(coupling, x.dtype):
                plan.append(_numpy_spline.coupling_step(coupling, x))
            else:
                plan = None
                break
        self.__dict__["_numpy_cache"] = (key, plan)
        return plan

    def _run(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        steps = self._frozen_steps(inverse)
        if steps is not None and self._compiled is not None and not inverse:
            return self._compiled(x, context)
        if steps is not None and not inverse and (plan := self._numpy_plan(x, context)) is not None:
            return _NumpyFlow.apply(plan, x, context, self._recorded_forward)
        if steps is None:
            steps = self._steps(reversed(self.blocks) if inverse else self.blocks, inverse)
        elif (
            x.shape[0] > self._chunk_rows
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or (context is not None and context.requires_grad)))
        ):
            # Frozen inference on a large CPU batch: run it in chunks, so that each layer's hidden activations stay
            # in cache (up to ~2x faster for the per-joint flows, whose layers are memory-bound). A GPU gets the
            # whole batch at once.
            n = self._chunk_rows
            chunks = [
                self._run_steps(steps, x[i : i + n], None if context is None else context[i : i + n])
                for i in range(0, x.shape[0], n)
            ]
            return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        return self._run_steps(steps, x, context)

    def _recorded_forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The forward block by block as tensor ops (what a fast path's second derivatives need)."""
        return self._run_steps(self._steps(self.blocks, inverse=False), x, context)

    @staticmethod
    def _run_steps(steps: list[_Step], x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        total: Tensor | None = None
        for step in steps:
            x, logdet = step(x, context)
            if logdet is not None:
                total = logdet if total is None else total + logdet
        return x, _full_logdet(total, x)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent.

        Args:
            x: Inputs, shape (B, G, D).
            context: Conditioner inputs, shape (B, G, C), or None for a flow without context.

        Returns:
            The latent codes, shape (B, G, D), and ``log |det dz/dx|`` per group, shape (B, G).
        """
        self._check(x, context)
        return self._run(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent to data.

        Args:
            z: Latent codes, shape (B, G, D).
            context: Conditioner inputs, shape (B, G, C), or None for a flow without context.

        Returns:
            The data, shape (B, G, D), and ``log |det dx/dz|`` per group, shape (B, G).
        """
        self._check(z, context)
        return self._run(z, context, inverse=True)

    def run_groups(
        self, index: Tensor, x: Tensor, context: Tensor | None = None, *, inverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The flows of a subset of the groups: ``forward`` (or ``inverse``) with the parameters' rows ``index``.

        Every parameter of the blocks has the group as its first dim (buffers are shared by the groups), so the
        subset runs through :func:`torch.func.functional_call` with those rows (gradients reach the parameters);
        a frozen flow in eval mode instead runs a cached frozen copy of those rows, with the frozen fast paths.
        The result equals the full flow's on the same groups.

        Args:
            index: Group indices, shape (L,), integer, each in ``[0, G)``.
            x: Inputs (latent codes with ``inverse``) of those groups, shape (B, L, D).
            context: Their conditioner inputs, shape (B, L, C), or None.
            inverse: Run latent to data.

        Returns:
            The outputs, shape (B, L, D), and the log-determinants, shape (B, L).
        """
        if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expected a 1-D integer tensor of group indices, got {index!r}")
        if index.numel() and not bool(((index >= 0) & (index < self.groups)).all()):
            raise ValueError(f"expected group indices in [0, {self.groups}), got {index.tolist()}")
        L = index.numel()
        _check_input(x, L, self.dim)
        _check_context(context, x, self.context_features)
        if L == self.groups and bool((index == torch.arange(L, device=index.device)).all()):
            return self._run(x, context, inverse)
        if self._frozen():
            return self._frozen_subset(index)._run(x, context, inverse)  # the fast paths of a frozen flow
        params = {name: p.index_select(0, index.to(p.device)) for name, p in self.named_parameters()}
        return torch.func.functional_call(_GroupRunner(self.blocks, inverse), params, (x, context))

    def _frozen_subset(self, index: Tensor) -> FlowSequence:
        """A frozen copy of the flows of the groups ``index`` (cached: a fitting loop asks for the same groups at
        every step), rebuilt when the parameters change."""
        key = (tuple(index.tolist()), storage_key(self._parameter_tuple()))
        cached = self._subsets.get(key[0])
        if cached is not None and key[1] is not None and cached[0] == key[1]:
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, as in _frozen_steps
            subset = FlowSequence(copy.deepcopy(self.blocks), index.numel(), self.dim)
            for module in subset.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None:
                        module._parameters[name] = nn.Parameter(p.index_select(0, index.to(p.device)), False)
                if isinstance(module, GroupedLinear):
                    module.groups = index.numel()
        subset.eval()
        if len(self._subsets) >= 16:  # a few tree levels or masks at a time; drop the oldest beyond that
            self._subsets.pop(next(iter(self._subsets)))
        self._subsets[key[0]] = (key[1], subset)
        return subset

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density under a standard-normal base.

        Args:
            x: Inputs, shape (B, G, D).
            context: Conditioner inputs, shape (B, G, C), or None.

        Returns:
            Log-density per group, shape (B, G).
        """
        if (
            self._fused_options is not None
            and torch.is_grad_enabled()
            and (x.requires_grad or (context is not None and context.requires_grad))
            and (steps := self._frozen_steps(False)) is not None  # frozen, folded linear blocks, versioned weights
        ):
            self._check(x, context)
            return _FusedLogProb.apply(self._fused_function(steps, x, context), x, context)
        z, logdet = self(x, context)
        return standard_normal_log_prob(z) + logdet

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Data-dependent initialisation: run ``x`` through, initialising every ActNorm on its own input.

        Args:
            x: A representative batch, shape (N, G, D) with N >= 2.
            context: Its conditioner inputs, shape (N, G, C), or None.
        """
        self._check(x, context)
        for block, step in zip(self.blocks, self._steps(self.blocks, inverse=False), strict=True):
            if isinstance(block, ActNorm):
                block.initialize(x)
            x, _ = step(x, context)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, dim={self.dim}, context_features={self.context_features}"


def ensemble_log_prob(flows: list[FlowSequence], x: Tensor) -> Tensor:
    """Log-densities of ``x`` (B, 1, D) under each of several one-group flows of the same architecture, (B, M).

    On a small CPU batch of frozen flows whose NumPy plans stack (the same steps, coupling masks and shapes; the
    folded linear maps and the weights may differ), the M flows run as the M groups of one NumPy flow: one pass of
    element-wise ops and one autograd node for the whole ensemble instead of M. Otherwise each flow runs on its own;
    the numbers are the same either way.
    """
    if not flows:
        raise ValueError("expected at least one flow, got none")
    _check_input(x, 1, flows[0].dim)
    plans = []
    if len(flows) > 1 and x.numel() * len(flows) <= NUMPY_MAX_ELEMENTS:
        for flow in flows:
            steps = flow._frozen_steps(False) if flow.groups == 1 and not flow.context_features else None
            plan = None if steps is None or flow._compiled is not None else flow._numpy_plan(x, None)
            if plan is None:
                break
            plans.append(plan)
    stacked = _stacked_plan(plans) if len(plans) == len(flows) > 1 else None
    if stacked is None:
        return torch.cat([flow.log_prob(x) for flow in flows], dim=-1)

    def recorded(x: Tensor, _: None) -> tuple[Tensor, Tensor]:  # flow m on group m
        outputs = [flow._recorded_forward(x[:, m : m + 1], None) for m, flow in enumerate(flows)]
        return torch.cat([z for z, _ in outputs], dim=1), torch.cat([logdet for _, logdet in outputs], dim=1)

    z, logdet = _NumpyFlow.apply(stacked, x.expand(-1, len(flows), -1).contiguous(), None, recorded)
    return standard_normal_log_prob(z) + logdet


_STACKED: list[tuple[list[_numpy_spline.Plan], _numpy_spline.Plan | None]] = []


def _stacked_plan(plans: list[_numpy_spline.Plan]) -> _numpy_spline.Plan | None:
    """One-group plans as the groups of one plan, or None if they do not stack (cached: a fitting loop asks for
    the same ensemble at every step; the cache holds the plans, so their identity is a valid key)."""
    for members, stacked in _STACKED:
        if len(members) == len(plans) and all(a is b for a, b in zip(members, plans, strict=True)):
            return stacked
    stacked: _numpy_spline.Plan | None = _numpy_spline.Plan() if len({len(plan) for plan in plans}) == 1 else None
    for steps in zip(*plans, strict=True) if stacked is not None else ():
        couplings = [step[0] for step in steps if isinstance(step[0], RQSplineCoupling)]
        if not couplings:  # folded linear maps: (1, D, D), (1, D), (1,) each
            stacked.append((*(np.concatenate([step[i] for step in steps]) for i in range(3)), False))
        elif len(couplings) == len(steps) and all(_numpy_spline.same_spline(couplings[0], c) for c in couplings[1:]):
            layers = zip(*(step[1] for step in steps), strict=True)  # per layer: every member's 3 arrays
            weights = [tuple(np.concatenate(a) for a in zip(*layer, strict=True)) for layer in layers]
            stacked.append((couplings[0], weights, steps[0][2]))
        else:
            stacked = None
            break
    if len(_STACKED) >= 8:  # a few ensembles at a time
        _STACKED.pop(0)
    _STACKED.append((plans, stacked))
    return stacked


NUMPY_MAX_ELEMENTS = 1024
"""A frozen flow whose input has at most this many entries (B x G x D) and lives on the CPU in float32 or float64
runs data to latent in NumPy (:mod:`posepriors.flows._numpy_spline`), one autograd node for the whole flow: on one
pose or a few, where per-op overhead is the cost, several times faster than the tensor ops. 0 turns it off."""


class _NumpyFlow(torch.autograd.Function):
    """A frozen flow's forward (data to latent) in NumPy as one autograd node: ``(x, context) -> (z, logdet)``,
    whose backward is the written-out vector-Jacobian product (gradients reach ``x`` and ``context``, never the
    weights: the flow is frozen). A backward with ``create_graph=True`` (second derivatives) runs ``recorded``, the
    same forward as tensor ops, and differentiates that."""

    @staticmethod
    def forward(  # noqa: ANN205
        ctx,  # noqa: ANN001
        plan: list,
        x: Tensor,
        context: Tensor | None,
        recorded: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]],
    ):
        z, logdet, ctx.saved = _numpy_spline.flow_forward(
            plan, x.detach().numpy(), None if context is None else context.detach().numpy()
        )
        ctx.plan, ctx.recorded = plan, recorded
        # the saved arrays are views of x and context: saving them lets autograd refuse a backward after an
        # in-place change of either (its version counter), as it does for any saved tensor
        ctx.save_for_backward(x, context)
        return torch.from_numpy(z), torch.from_numpy(logdet)

    @staticmethod
    def backward(ctx, grad_z: Tensor, grad_logdet: Tensor) -> tuple[None, Tensor, Tensor | None, None]:  # noqa: ANN001
        inputs = ctx.saved_tensors  # raises if the input was modified in place since the forward
        if torch.is_grad_enabled():  # create_graph: the tensor ops' backward, itself differentiable
            return (None, *recorded_vjp(ctx.recorded, inputs, (grad_z, grad_logdet)), None)
        grad_x, grad_context = _numpy_spline.flow_backward(ctx.plan, ctx.saved, grad_z.numpy(), grad_logdet.numpy())
        return None, torch.from_numpy(grad_x), None if grad_context is None else torch.from_numpy(grad_context), None


class _FusedLogProb(torch.autograd.Function):
    """``log_prob`` of a frozen flow as one autograd node whose forward already computed the input gradient (see
    :meth:`FlowSequence.compile_frozen`); the backward scales it. Every output (b, g) depends on the input and
    context of (b, g) only, so the gradient of the sum is the per-entry gradient. First derivatives only: a backward
    with ``create_graph=True`` raises."""

    @staticmethod
    def forward(ctx, function: Callable[..., tuple[Tensor, ...]], x: Tensor, context: Tensor | None) -> Tensor:  # noqa: ANN001
        value, *grads = function(x, context)
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    def backward(ctx, grad_value: Tensor) -> tuple[None, Tensor, Tensor | None]:  # noqa: ANN001
        if torch.is_grad_enabled():  # create_graph: its second derivatives would come out as zeros; refuse it
            raise RuntimeError(
                "compile(gradient=True) gives first derivatives only; for second derivatives (a Hessian) call "
                "prior.compile(False) or compile() without gradient=True"
            )
        scale = grad_value.unsqueeze(-1)
        grads = ctx.saved_tensors
        return None, scale * grads[0], scale * grads[1] if len(grads) > 1 else None


class _GroupRunner(nn.Module):
    """The blocks of a :class:`FlowSequence` run unchecked on any number of groups (see ``run_groups``): it holds
    the same ``blocks`` list, so its parameter names are the sequence's."""

    def __init__(self, blocks: nn.ModuleList, inverse: bool) -> None:
        super().__init__()
        self.blocks = blocks
        self.inverse = inverse

    def forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        blocks = reversed(self.blocks) if self.inverse else self.blocks
        return FlowSequence._run_steps(FlowSequence._steps(blocks, self.inverse), x, context)
