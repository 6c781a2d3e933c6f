"""Shared pieces of the paper's learning experiments (portfolio, TV denoising, nonconvex DFL):
data generators, problem layers and the seeded training loop the three suites run."""
