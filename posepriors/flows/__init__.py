"""Normalizing-flow building blocks shared by ``joint_flow`` and ``global_flow``.

Every block works on **grouped** inputs ``x`` of shape (B, G, D): G independent groups, each with its own parameters
(a global flow has G = 1 and D = the pose dimension; the per-joint flows have G = J joints and D = 3), and an
optional context of shape (B, G, C) that is fed to the coupling conditioners (ActNorm, LU and permutations ignore it).
Every parameter has the group as its first dim, so the flows of a subset of groups run with those rows
(:meth:`FlowSequence.run_groups`).

The block protocol:

- ``forward(x, context=None) -> (z, logabsdet)`` maps data to latent (the direction used by ``log_prob``);
  ``logabsdet`` is ``log |det dz/dx|`` per group, shape (B, G), so a per-joint flow can report a per-joint breakdown.
- ``inverse(z, context=None) -> (x, logabsdet)`` maps latent to data (sampling) and returns the inverse's
  log-determinant, the negative of the forward one at the same point.

Speed: these blocks sit inside fitting loops, so a layer is a handful of tensor ops. Conditioners run the groups as
one batched matrix product (:func:`torch.baddbmm` over stacked weights, never a Python loop over groups), couplings
split their inputs with precomputed index buffers (or views when the split is contiguous) instead of multiplying by
masks, and :class:`FlowSequence` validates its input once and then runs its blocks' unchecked ``_forward`` /
``_inverse`` directly (so hooks registered on the blocks inside a sequence do not fire; hooks on the sequence do).
Parameter-only log-determinants (ActNorm, LU) are summed as (G,) vectors and broadcast to (B, G) once. Frozen
inference (eval mode, no parameter gradients) folds ActNorm and mixing into one cached affine map per layer, runs every
coupling as one autograd node with a written-out backward (which flushes subnormal gradients to zero), runs the
conditioners' activations in place wherever autograd records nothing, and splits large CPU batches into chunks that
keep each layer's hidden activations in cache; :meth:`FlowSequence.compile_frozen` opts in to ``torch.compile``.
On the CPU with Numba installed (``pip install "posepriors[fast]"``), a spline coupling that records no autograd, or
runs as one frozen autograd node, evaluates its spline (and its written-out backward) as one fused kernel
(``posepriors.flows._numba_spline``) instead of some 60 tensor ops, and a frozen flow on a few poses (its NumPy
path) runs each coupling whose conditioner has one hidden layer, conditioner and spline, as one loop in the calling
thread; Numba loads after the first 32 calls that could use it (or at once for a very large one), and
``POSEPRIORS_NUMBA=0`` turns all of it off.

Modules: :mod:`~posepriors.flows.core` (the block protocol), :mod:`~posepriors.flows.linear` (ActNorm, permutations,
LU mixing), :mod:`~posepriors.flows.couplings` (affine and spline couplings), :mod:`~posepriors.flows.sequence`
(composition and the frozen fast path) and :mod:`~posepriors.flows.builder` (:func:`build_flow`). The grouped
conditioner networks live in :mod:`posepriors.grouped`.
"""

from posepriors.flows.builder import FLOW_SETTINGS, build_flow, check_flow_settings, flow_settings
from posepriors.flows.core import standard_normal_log_prob
from posepriors.flows.couplings import AffineCoupling, RQSplineCoupling
from posepriors.flows.linear import ActNorm, LULinear, Permutation
from posepriors.flows.sequence import FlowSequence
from posepriors.grouped import GroupedLinear, GroupedMLP

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "FlowSequence",
    "GroupedLinear",
    "GroupedMLP",
    "LULinear",
    "Permutation",
    "RQSplineCoupling",
    "build_flow",
    "FLOW_SETTINGS",
    "check_flow_settings",
    "flow_settings",
    "standard_normal_log_prob",
]
