"""fmm: learn two-time flow maps X_{s,t} of stochastic-interpolant ODEs (Flow Map Matching,
Boffi, Albergo & Vanden-Eijnden, arXiv 2406.07507) and compare few-step generative models."""

__version__ = "0.1.0"
