"""Flow matching: the velocity teacher, trained on the diagonal of the flow map.

L_b(v) = E_t E |v_{t,t}(I_t) - dI_t/dt|^2 (Lipman et al. 2023; Albergo & Vanden-Eijnden 2023;
restated as the diagonal term L_b of LSD 2505.18825 §3.1). Its unique minimiser is the interpolant
velocity b_t(x) = E[dI_t/dt | I_t = x], so v_{t,t} becomes a velocity teacher for distillation.
"""

from __future__ import annotations

from pydantic import Field

from fmm.objectives.base import Objective, ObjectiveOptions
from fmm.objectives.registry import register


class FlowMatchingOptions(ObjectiveOptions):
    diagonal_fraction: float = Field(1.0, ge=1.0, le=1.0)


@register
class FlowMatching(Objective):
    name = "flow_matching"
    paper = "Lipman et al. 2023 (2210.02747); Albergo & Vanden-Eijnden 2023; LSD 2505.18825 §3.1"
    equation = "L_b = E|v_{t,t}(I_t) - dI_t/dt|^2"
    Options = FlowMatchingOptions
