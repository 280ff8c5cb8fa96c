"""`fmm fid A [B]`: the Fréchet Inception distance between two image sets, through the code the
evaluations use (fmm.evaluation.fid), and `--save-stats` to keep a set's statistics for later.

Either side may be precomputed statistics (an .npz that `--save-stats` wrote); statistics are
compared only when they were made with the same weights (sha256), resize and image shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from fmm.evaluation import fid
from fmm.evaluation.image_sets import open_set


@dataclass
class FidResult:
    value: float | None       # None when only statistics were written
    a: fid.Statistics
    b: fid.Statistics | None

    def text(self) -> str:
        def side(s: fid.Statistics) -> str:
            return f"{s.source} ({s.count} images, {'x'.join(map(str, s.shape))})"
        lines = [] if self.value is None else [f"FID {self.value:.4f}", f"  A: {side(self.a)}", f"  B: {side(self.b)}"]
        lines.append(f"  weights sha256 {self.a.weights_sha256[:16]}..., resize {self.a.resize}")
        return "\n".join(lines)


def run_fid(a: str, b: str | None = None, *, save_stats: str | None = None, weights: str | None = None,
            device: str = "cpu", batch: int = 64, progress: bool = True) -> FidResult:
    """The FID of A against B (each a set or statistics), and A's statistics written to `save_stats`."""
    if b is None and save_stats is None:
        raise ValueError("fmm fid needs two sets (A B) to compare, or one set and --save-stats OUT.npz.")
    if save_stats is not None and not save_stats.endswith(".npz"):
        raise ValueError(f"--save-stats writes an .npz; got {save_stats!r}.")
    sets = [open_set(a)] + ([open_set(b)] if b is not None else [])
    if save_stats is not None and isinstance(sets[0], fid.Statistics):
        raise ValueError(f"--save-stats: {a!r} already is statistics; give an image set.")
    images = [s for s in sets if not isinstance(s, fid.Statistics)]
    if len(images) == 2 and images[0].shape != images[1].shape:
        raise ValueError(f"FID of {a!r} ({'x'.join(map(str, images[0].shape))}) against {b!r} "
                         f"({'x'.join(map(str, images[1].shape))}): the sets' image sizes differ; compare sets of one "
                         f"size.")
    for s in images:
        s.check()
    weights_hash = fid.sha256(fid.resolve_weights(weights))
    for s in sets:
        if isinstance(s, fid.Statistics) and s.weights_sha256 != weights_hash:
            raise ValueError(f"FID statistics {s.source!r} were computed with weights of sha256 "
                             f"{s.weights_sha256[:16]}... but the weights in use have {weights_hash[:16]}...: give "
                             f"the same weights (--weights) or recompute the statistics with these.")
    extractor = fid.InceptionFeatures(weights, device) if images else None
    stats = [s if isinstance(s, fid.Statistics) else
             extractor.statistics(s.batches(batch), s.source, progress, total=-(-s.count // batch)) for s in sets]
    value = stats[0].distance(stats[1]) if len(stats) == 2 else None
    if save_stats is not None:
        stats[0].save(save_stats)
    return FidResult(value, stats[0], stats[1] if len(stats) == 2 else None)
