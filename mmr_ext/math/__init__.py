"""Pure tensor functions behind the geometry, the losses and the certificates (docs/MATH.md).

Layer 0: torch/numpy only, no nn.Module, no import of another mmr_ext package. One home per formula:

- ``norms``: norm names and the dual exponent; ``distances``: dual norms and distances (§2);
- ``topk_hinge``: the hinge and the top-k hinge mean reference (§6);
- ``ball_radii`` (naive, union), ``hull_radius``, ``universal_radius``: radii of l1/l∞ balls (§4, §5);
  ``rounding``: float64 results cast toward zero;
- lp-ball ∩ box solvers (§7): ``box_distance`` (public distance / closest-point functions) with
  one solver per norm in ``box_distance_l1``, ``box_distance_l2`` (p = 2 and inf), ``box_distance_lp``;
  ``box_support`` (min of a linear function), ``box_projection`` (Euclidean projection);
  ``breakpoints``: the sorted breakpoints and prefix sums they share.

Submodules are imported by name (``from mmr_ext.math.hull_radius import hull_radius``); this
package re-exports nothing, so that no function shadows the module of the same name.
"""
