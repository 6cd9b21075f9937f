"""Research code around the PeRFlow runtime: the analytic digits model, the piecewise-reflow trainer, the
benchmark, the demo and the `perflow` command line. Nothing in the runtime (and nothing the ComfyUI nodes load)
imports this package."""
