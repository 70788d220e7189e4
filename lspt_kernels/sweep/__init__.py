"""`lspt-sweep`: the official hyper-parameter protocol (VPT's VTAB-1k / FGVC tuning, GaPT's grid) as one
resumable command, run by `lspt-train` subprocesses on one machine or on a SLURM cluster (submitit), ending
in the paper's tables.

One module, one job:
    protocols   the presets (grids, seeds, splits) with their sources; the standard task names and groups
    paper       the LSPT paper's published numbers (tables 1, 2, 3) as data
    plan        from a command line to the list of runs; the plan's identity (SWEEP/plan.json)
    state       a run's folder: done / diverged markers, the per-run lock, its log
    launchers   how one run is executed (lock, lspt-train subprocess, marker) and the local / submitit pools
    selection   the protocol's choice of lr / weight decay from the grid runs' last epochs
    driver      the loop: grid runs, selection per cell, final runs, retries, the status line
    report      paper-style tables: Markdown, CSV, JSON, PNG
    cli         `lspt-sweep run ...` / `lspt-sweep report SWEEP`

docs/sweep.md describes the protocol, the sweep folder and the commands that reproduce the paper's tables.
"""
