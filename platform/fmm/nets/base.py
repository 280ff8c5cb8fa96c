"""What every two-time network shares: the call v_theta(s, t, x) and its argument checks."""

from __future__ import annotations

from torch import Tensor, nn

from fmm.tensor_checks import batch_times


class TwoTimeNet(nn.Module):
    """A network v_theta(s, t, x) with x of shape [B, *sample_shape] and s, t of shape [B].

    Subclasses set `sample_shape` and implement `velocity_slope(s, t, x)`; `forward` checks the
    arguments first, so a wrong shape is an error naming both shapes, never a broadcast.
    """

    sample_shape: tuple[int, ...] = ()

    def forward(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != tuple(self.sample_shape) or x.dim() != len(self.sample_shape) + 1:
            raise ValueError(
                f"{type(self).__name__} takes x of shape [B, {', '.join(map(str, self.sample_shape))}]; "
                f"got {tuple(x.shape)}."
            )
        s, t = batch_times(s, x, "s"), batch_times(t, x, "t")
        return self.velocity_slope(s, t, x)

    def velocity_slope(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
